//! Helpers for network tests: a real node on 127.0.0.1 with a fresh data
//! directory and certificate, and phones connected to it with the pin.

use std::sync::Arc;
use std::time::Duration;

use tapledger_node::config::{DataDir, NodeConfig};
use tapledger_node::init::{init_data_dir, load_admin_credential};
use tapledger_node::{ApiCredentials, ClientEndpoint, Phone, RunningNode};
use tapledger_protocol::{AccountId, Secret};

pub struct TestNode {
    pub node: RunningNode,
    pub admin: Secret,
    pub endpoint: ClientEndpoint,
    _dir: tempfile::TempDir,
}

impl TestNode {
    pub async fn start(configure: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = DataDir::new(dir.path().join("data"));
        init_data_dir(&data_dir, &["localhost".into(), "127.0.0.1".into()]).expect("init");
        let mut config = NodeConfig::new(data_dir.path(), "127.0.0.1:0".parse().unwrap());
        configure(&mut config);
        let node = RunningNode::start(config).await.expect("start node");
        let admin = load_admin_credential(&data_dir.admin()).expect("admin credential");
        let endpoint =
            ClientEndpoint::new(node.fingerprint, node.local_addr).expect("client endpoint");
        TestNode {
            node,
            admin,
            endpoint,
            _dir: dir,
        }
    }

    pub async fn connect(&self) -> Phone {
        crate::support::within(self.endpoint.connect(self.node.local_addr, "localhost"))
            .await
            .expect("connect")
    }

    /// Opens a funded account over the wire and returns a phone authenticated as it.
    pub async fn phone_with_account(
        &self,
        opening_balance: u64,
    ) -> (AccountId, Phone, ApiCredentials) {
        let credentials = ApiCredentials::generate();
        let admin_phone = self.connect().await;
        let account = admin_phone
            .open_account(
                &self.admin,
                "checking",
                "Test Bank",
                &credentials,
                opening_balance,
            )
            .await
            .expect("open account");
        admin_phone.close().await;
        let mut phone = self.connect().await;
        phone
            .authenticate(account, &credentials.key)
            .await
            .expect("authenticate");
        (account, phone, credentials)
    }

    pub fn ledger(&self) -> &Arc<tapledger_actors::Ledger> {
        self.node.ledger()
    }

    pub async fn stop(self) {
        crate::support::within(self.node.shutdown(Duration::from_secs(5))).await;
    }
}
