//! Who leads and who is a member: ordered campaigns and pre-vote
//! ([`election`]), check-quorum, step-down and transfer ([`leadership`]),
//! data-directory incarnations ([`incarnation`]), membership changes
//! ([`membership`]) and [`autopilot`].

pub mod autopilot;
pub mod election;
pub mod incarnation;
pub mod leadership;
pub mod membership;
