//! Helpers over the node's phone client (feature `node`): accounts opened
//! over QUIC with the admin credential and fresh API credentials, phones
//! authenticated as them, and a client endpoint pinned to a
//! [`NodeProcess`]. For integration tests only (see the crate's docs).

use std::net::SocketAddr;
use std::path::Path;

use tapledger_node::init::load_admin_credential;
use tapledger_node::{ApiCredentials, ClientEndpoint, ClientError, Phone};
use tapledger_protocol::{AccountId, Secret};

use crate::process::NodeProcess;

/// The server name tests connect with (every test certificate carries it).
pub const SERVER_NAME: &str = "localhost";

/// The admin credential `tapledger-node init` wrote into `data`.
pub fn admin_credential(data: &Path) -> Secret {
    load_admin_credential(&data.join("admin.key")).expect("admin credential")
}

/// An account opened over a connection of its own with the admin
/// credential, and the API credentials its phone authenticates with.
pub struct WireAccount {
    pub id: AccountId,
    pub credentials: ApiCredentials,
}

/// Connects to `node`, opens an account of `account_type` at `bank` funded
/// with `opening_balance` under new API credentials, and closes the
/// connection.
pub async fn open_account(
    endpoint: &ClientEndpoint,
    node: SocketAddr,
    admin: &Secret,
    account_type: &str,
    bank: &str,
    opening_balance: u64,
) -> Result<WireAccount, ClientError> {
    let operator = endpoint.connect(node, SERVER_NAME).await?;
    let credentials = ApiCredentials::generate();
    let opened = operator
        .open_account(admin, account_type, bank, &credentials, opening_balance)
        .await;
    operator.close().await;
    Ok(WireAccount {
        id: opened?,
        credentials,
    })
}

/// A new connection to `node` authenticated as `account`: a phone.
pub async fn authenticated_phone(
    endpoint: &ClientEndpoint,
    node: SocketAddr,
    account: AccountId,
    credentials: &ApiCredentials,
) -> Result<Phone, ClientError> {
    let mut phone = endpoint.connect(node, SERVER_NAME).await?;
    phone.authenticate(account, &credentials.key).await?;
    Ok(phone)
}

impl NodeProcess {
    /// A client endpoint that pins this node's certificate.
    pub fn endpoint(&self) -> ClientEndpoint {
        ClientEndpoint::new(self.fingerprint(), self.quic()).expect("client endpoint")
    }
}
