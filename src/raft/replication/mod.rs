//! Moving the log between members: openraft's network over the peers'
//! channels ([`network`]), entries sent ahead of openraft's requests
//! ([`pipeline`]), the `RaftTransport` service that receives them
//! ([`transport`]) and who may call it ([`peer_trust`]), and group commit of
//! client proposals ([`coalesce`]).

pub mod coalesce;
pub mod network;
pub mod peer_trust;
pub mod pipeline;
pub mod transport;
