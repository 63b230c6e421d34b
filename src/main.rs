fn main() -> std::process::ExitCode {
    roster::main()
}
