//! Rust client for Roster.
