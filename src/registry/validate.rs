//! Input limits. Every write is checked here before it is proposed to Raft, so
//! a rejected request never reaches the log.

use std::net::IpAddr;

use super::model::{Metadata, MAINTENANCE_KEY, SESSION_KEY};
use crate::error::{Error, Result};

pub const MAX_NAME_LEN: usize = 63;
pub const MAX_ID_LEN: usize = 128;
pub const MAX_ADDRESS_LEN: usize = 253;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_LEN: usize = 128;
pub const MAX_METADATA_KEYS: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Sum of key and value lengths over all metadata entries.
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_WEIGHT: u32 = 10_000;
pub const DEFAULT_WEIGHT: u32 = 1;

/// Health check defaults and bounds (milliseconds and counts).
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_CHECK_TIMEOUT_MS: u64 = 2_000;
pub const DEFAULT_TTL_MS: u64 = 30_000;
pub const DEFAULT_FAILURES_BEFORE_CRITICAL: u32 = 3;
pub const DEFAULT_SUCCESSES_BEFORE_PASSING: u32 = 1;
pub const MIN_CHECK_MS: u64 = 100;
pub const MAX_CHECK_MS: u64 = 3_600_000;
pub const MAX_THRESHOLD: u32 = 100;

/// Session TTL bounds and default (milliseconds). The floor leaves room for
/// a renewal to be batched, forwarded, and to survive an election.
pub const DEFAULT_SESSION_TTL_MS: u64 = 10_000;
pub const MIN_SESSION_TTL_MS: u64 = 1_000;
pub const MAX_SESSION_NAME_LEN: usize = 128;
/// A session id is 32 hex digits (128 random bits).
pub const SESSION_ID_LEN: usize = 32;

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// A service name is a DNS label (RFC 1123), so it can be used in DNS-based discovery.
pub fn service_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid("service name is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "service name is {} characters, the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if !is_dns_label(name) {
        return Err(invalid(format!(
            "service name {name:?} must hold only letters, digits and '-', and not start or end with '-'"
        )));
    }
    Ok(())
}

/// A namespace name is a DNS label, as a service name is; `service` and
/// `instance` are taken by DNS names (`web.service.<namespace>.<domain>`).
pub fn namespace_name(name: &str) -> Result<()> {
    let rule = "a namespace name is 1 to 63 letters, digits and '-', not starting or ending \
                with '-', and not `service` or `instance`";
    if name.len() > MAX_NAME_LEN || !is_dns_label(name) || name == "service" || name == "instance" {
        return Err(invalid(format!("namespace {name:?} is not valid: {rule}")));
    }
    Ok(())
}

/// A token's service scope: a service name, or `prefix*` where the prefix is
/// the start of one (possibly empty: every service).
pub fn service_pattern(pattern: &str) -> Result<()> {
    // `ns/pattern`: in namespace `ns` (`*`: any).
    let pattern = match pattern.split_once('/') {
        Some(("*", p)) => p,
        Some((ns, p)) => {
            namespace_name(ns)?;
            p
        }
        None => pattern,
    };
    let Some(prefix) = pattern.strip_suffix('*') else {
        return service_name(pattern);
    };
    let fits = prefix.len() < MAX_NAME_LEN
        && !prefix.starts_with('-')
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !fits {
        return Err(invalid(format!(
            "service pattern {pattern:?} must be a service name or the start of one followed by '*'"
        )));
    }
    Ok(())
}

/// A token's description: free text, bounded.
pub fn description(text: &str) -> Result<()> {
    free_text("description", text)
}

/// Why an instance is in maintenance: free text, bounded.
pub fn maintenance_reason(text: &str) -> Result<()> {
    free_text("reason", text)
}

fn free_text(what: &str, text: &str) -> Result<()> {
    const MAX: usize = 256;
    if text.len() > MAX {
        return Err(invalid(format!(
            "{what} is {} bytes, the limit is {MAX}",
            text.len()
        )));
    }
    Ok(())
}

/// A secret chosen by the caller (the bootstrap token's): long enough not to
/// be guessed, and sendable as an `authorization` header.
pub fn secret(secret: &str) -> Result<()> {
    const MIN: usize = 32;
    const MAX: usize = 256;
    if !(MIN..=MAX).contains(&secret.len()) {
        return Err(invalid(format!(
            "secret is {} characters; give {MIN} to {MAX} (e.g. `openssl rand -hex 32`)",
            secret.len()
        )));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "secret must be printable ASCII without spaces (it is sent as a header)".into(),
        ));
    }
    Ok(())
}

/// Instance ids are freer than service names: they often embed host:port.
pub fn instance_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(invalid("instance id is empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "instance id is {} characters, the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(invalid(format!(
            "instance id {id:?} holds {c:?}; allowed are letters, digits, '-', '_', '.' and ':'"
        )));
    }
    Ok(())
}

/// An IP address or a DNS host name.
pub fn address(addr: &str) -> Result<()> {
    if addr.is_empty() {
        return Err(invalid("address is empty".into()));
    }
    if addr.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let host = addr.strip_suffix('.').unwrap_or(addr);
    if addr.len() <= MAX_ADDRESS_LEN && host.split('.').all(is_dns_label) {
        return Ok(());
    }
    Err(invalid(format!(
        "address {addr:?} is neither an IP address nor a host name"
    )))
}

pub fn port(port: u32) -> Result<u16> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(format!("port {port} is outside 1..=65535"))),
    }
}

pub fn weight(weight: u32) -> Result<u32> {
    match weight {
        0 => Ok(DEFAULT_WEIGHT),
        w if w > MAX_WEIGHT => Err(invalid(format!(
            "weight {w} is over the limit of {MAX_WEIGHT}"
        ))),
        w => Ok(w),
    }
}

pub fn tags(tags: &[String]) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(invalid(format!(
            "{} tags, the limit is {MAX_TAGS}",
            tags.len()
        )));
    }
    for t in tags {
        if t.is_empty() || t.len() > MAX_TAG_LEN {
            return Err(invalid(format!(
                "tag {t:?} must be 1 to {MAX_TAG_LEN} bytes"
            )));
        }
    }
    Ok(())
}

/// A session's TTL; 0 means the default.
pub fn session_ttl(ttl_ms: u32) -> Result<u64> {
    match u64::from(ttl_ms) {
        0 => Ok(DEFAULT_SESSION_TTL_MS),
        t if (MIN_SESSION_TTL_MS..=MAX_CHECK_MS).contains(&t) => Ok(t),
        t => Err(invalid(format!(
            "session ttl_ms {t} is out of range: {MIN_SESSION_TTL_MS} to {MAX_CHECK_MS} (0: {DEFAULT_SESSION_TTL_MS})"
        ))),
    }
}

pub fn session_name(name: &str) -> Result<()> {
    if name.len() > MAX_SESSION_NAME_LEN || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "session name must be at most {MAX_SESSION_NAME_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

pub fn session_id(id: &str) -> Result<()> {
    if id.len() != SESSION_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!(
            "session id {id:?} is not one: ids are {SESSION_ID_LEN} hex digits, as CreateSession returns them"
        )));
    }
    Ok(())
}

pub fn metadata(md: &Metadata) -> Result<()> {
    if md.contains_key(SESSION_KEY) {
        return Err(invalid(format!(
            "metadata key {:?} is reserved: register under a session with RegisterRequest.session",
            SESSION_KEY
        )));
    }
    if md.contains_key(MAINTENANCE_KEY) {
        return Err(invalid(format!(
            "metadata key {MAINTENANCE_KEY:?} is reserved: put an instance into maintenance \
             with SetMaintenance (roster maintenance enable)"
        )));
    }
    if md.len() > MAX_METADATA_KEYS {
        return Err(invalid(format!(
            "{} metadata keys, the limit is {MAX_METADATA_KEYS}",
            md.len()
        )));
    }
    let mut total = 0;
    for (k, v) in md.iter() {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(invalid(format!(
                "metadata key {k:?} must be 1 to {MAX_METADATA_KEY_LEN} bytes"
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(invalid(format!(
            "metadata is {total} bytes, the limit is {MAX_METADATA_BYTES}"
        )));
    }
    Ok(())
}

/// A check period: 0 takes `default`, anything else must lie within bounds.
pub fn period_ms(what: &str, v: u64, default: u64) -> Result<u64> {
    match v {
        0 => Ok(default),
        v if (MIN_CHECK_MS..=MAX_CHECK_MS).contains(&v) => Ok(v),
        v => Err(invalid(format!(
            "{what} {v} ms is outside {MIN_CHECK_MS}..={MAX_CHECK_MS} ms"
        ))),
    }
}

/// A consecutive-results threshold: 0 takes `default`.
pub fn threshold(what: &str, v: u32, default: u32) -> Result<u32> {
    match v {
        0 => Ok(default),
        v if v <= MAX_THRESHOLD => Ok(v),
        v => Err(invalid(format!("{what} {v} is over {MAX_THRESHOLD}"))),
    }
}

pub fn percent(what: &str, v: u32) -> Result<u32> {
    if v > 100 {
        return Err(invalid(format!("{what} {v}% is over 100%")));
    }
    Ok(v)
}

/// An HTTP check path: absolute, printable, short.
pub fn http_path(path: &str) -> Result<String> {
    let path = if path.is_empty() { "/" } else { path };
    if !path.starts_with('/') || path.len() > 1024 || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "HTTP check path {path:?} must start with '/' and hold at most 1024 printable characters"
        )));
    }
    Ok(path.to_string())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(service_name("payments-v2").is_ok());
        assert!(service_name("").is_err());
        assert!(service_name("-x").is_err());
        assert!(service_name("a_b").is_err());
        assert!(service_name(&"a".repeat(64)).is_err());
        assert!(instance_id("10.0.0.1:8080").is_ok());
        assert!(instance_id("a b").is_err());
    }

    #[test]
    fn addresses_and_ports() {
        assert!(address("10.1.2.3").is_ok());
        assert!(address("::1").is_ok());
        assert!(address("db-1.internal.example").is_ok());
        assert!(address("no spaces").is_err());
        assert!(address("a..b").is_err());
        assert_eq!(port(8080).ok(), Some(8080));
        assert!(port(0).is_err());
        assert!(port(65536).is_err());
        assert_eq!(weight(0).ok(), Some(DEFAULT_WEIGHT));
        assert!(weight(MAX_WEIGHT + 1).is_err());
    }

    #[test]
    fn session_inputs() {
        assert_eq!(session_ttl(0).ok(), Some(DEFAULT_SESSION_TTL_MS));
        assert!(session_ttl(999).is_err());
        assert_eq!(session_ttl(1_000).ok(), Some(1_000));
        assert!(session_id("0123456789abcdef0123456789abcdef").is_ok());
        assert!(session_id("xyz").is_err());
        assert!(session_name("host-1 pid 42").is_ok());
        assert!(session_name("a\nb").is_err());
        let md = [(SESSION_KEY.to_string(), "x".into())]
            .into_iter()
            .collect();
        let e = metadata(&md).expect_err("reserved");
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    #[test]
    fn metadata_limits() {
        let mut md = Metadata::default();
        md.insert("k".to_string(), "v".repeat(MAX_METADATA_BYTES));
        assert!(metadata(&md).is_err());
        md.insert("k".to_string(), "v".into());
        assert!(metadata(&md).is_ok());
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| i.to_string()).collect();
        assert!(tags(&many).is_err());
    }
}
