//! The Acl service: the first admin token, then tokens made, listed and
//! revoked by admins. Secrets are drawn here (on the leader), returned once,
//! and stored only as their hash, replicated through Raft like any write.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{hash_secret, random_hex};
use super::read_state;
use crate::error::Error;
use crate::proto::v1 as pb;
use crate::proto::v1::acl_server::Acl;
use crate::raft::proposer::Proposer;
use crate::registry::acl::{Role, Token};
use crate::registry::leases::now_ms;
use crate::registry::validate;
use crate::registry::watch::SharedState;
use crate::registry::{Command, Outcome};

pub struct AclApi {
    state: SharedState,
    proposer: Arc<Proposer>,
}

impl AclApi {
    pub fn new(state: SharedState, proposer: Arc<Proposer>) -> Self {
        AclApi { state, proposer }
    }

    /// Proposes a new token, with `secret` or one drawn here; the answer
    /// carries the secret.
    async fn create(
        &self,
        role: Role,
        services: Vec<String>,
        description: String,
        bootstrap: bool,
        secret: Option<String>,
    ) -> Result<pb::CreatedToken, Status> {
        validate::description(&description)?;
        for s in &services {
            validate::service_pattern(s)?;
        }
        if role == Role::Admin && !services.is_empty() {
            return Err(Error::InvalidArgument(
                "admin tokens reach every service: give no services for an admin token".into(),
            )
            .into());
        }
        self.proposer.here()?;
        let secret = match secret {
            Some(s) => s,
            None => random_hex(32)?,
        };
        let token = Token {
            accessor: random_hex(16)?,
            secret_hash: hash_secret(&secret),
            role,
            services,
            description,
            created_ms: now_ms(),
        };
        let info = token_to_pb(&token);
        let r = self
            .proposer
            .propose(Command::CreateToken { token, bootstrap })
            .await?;
        match r.outcome {
            Outcome::TokenCreated => Ok(pb::CreatedToken {
                token: Some(info),
                secret,
                revision: r.revision,
            }),
            Outcome::AlreadyBootstrapped => self.bootstrapped_with(secret, r.revision),
            other => Err(Error::Internal(format!("token creation applied as {other:?}")).into()),
        }
    }

    /// The answer to a Bootstrap once the ACL was bootstrapped: the same
    /// token again if `secret` is the bootstrap token's (a retry whose first
    /// answer was lost), FAILED_PRECONDITION otherwise.
    fn bootstrapped_with(&self, secret: String, revision: u64) -> Result<pb::CreatedToken, Status> {
        let token = read_state(&self.state, |st| {
            st.catalog
                .acl()
                .find(&hash_secret(&secret))
                .filter(|t| t.role == Role::Admin)
                .map(|t| token_to_pb(t))
        })?;
        match token {
            Some(info) if !secret.is_empty() => Ok(pb::CreatedToken {
                token: Some(info),
                secret,
                revision,
            }),
            _ => Err(already_bootstrapped()),
        }
    }
}

fn already_bootstrapped() -> Status {
    Error::FailedPrecondition(
        "the ACL was bootstrapped already; ask an admin for a token (roster token create)".into(),
    )
    .into()
}

fn role_to_pb(r: Role) -> pb::Role {
    match r {
        Role::Read => pb::Role::Read,
        Role::Write => pb::Role::Write,
        Role::Admin => pb::Role::Admin,
    }
}

fn role_from_pb(r: i32) -> Result<Role, Status> {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Read) => Ok(Role::Read),
        Ok(pb::Role::Write) => Ok(Role::Write),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        _ => Err(
            Error::InvalidArgument("role must be ROLE_READ, ROLE_WRITE or ROLE_ADMIN".into())
                .into(),
        ),
    }
}

fn token_to_pb(t: &Token) -> pb::TokenInfo {
    pb::TokenInfo {
        accessor: t.accessor.clone(),
        role: role_to_pb(t.role) as i32,
        services: t.services.clone(),
        description: t.description.clone(),
        created_ms: t.created_ms,
    }
}

#[tonic::async_trait]
impl Acl for AclApi {
    async fn bootstrap(
        &self,
        req: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::CreatedToken>, Status> {
        let pb::BootstrapRequest {
            description,
            secret,
        } = req.into_inner();
        let secret = match secret.is_empty() {
            true => None,
            false => {
                validate::secret(&secret)?;
                Some(secret)
            }
        };
        let (bootstrapped, revision) = read_state(&self.state, |st| {
            (st.catalog.acl().bootstrapped(), st.catalog.revision())
        })?;
        if bootstrapped {
            return self
                .bootstrapped_with(secret.unwrap_or_default(), revision)
                .map(Response::new);
        }
        let description = match description.is_empty() {
            true => "bootstrap token".to_string(),
            false => description,
        };
        let created = self
            .create(Role::Admin, Vec::new(), description, true, secret)
            .await?;
        Ok(Response::new(created))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreatedToken>, Status> {
        let pb::CreateTokenRequest {
            role,
            services,
            description,
        } = req.into_inner();
        let role = role_from_pb(role)?;
        let created = self
            .create(role, services, description, false, None)
            .await?;
        Ok(Response::new(created))
    }

    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let mut tokens: Vec<pb::TokenInfo> = read_state(&self.state, |st| {
            st.catalog.acl().tokens().map(token_to_pb).collect()
        })?;
        tokens.sort_by(|a, b| (a.created_ms, &a.accessor).cmp(&(b.created_ms, &b.accessor)));
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let accessor = req.into_inner().accessor;
        if accessor.is_empty() {
            return Err(Error::InvalidArgument("accessor is empty".into()).into());
        }
        let r = self
            .proposer
            .propose(Command::RevokeToken {
                accessor: accessor.clone(),
            })
            .await?;
        match r.outcome {
            Outcome::TokenRevoked => Ok(Response::new(pb::RevokeTokenResponse {
                revision: r.revision,
            })),
            _ => Err(Error::NotFound(format!("no token with accessor {accessor}")).into()),
        }
    }
}
