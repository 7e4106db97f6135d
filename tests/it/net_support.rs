//! Helpers for network tests: a real node on 127.0.0.1 with a fresh data
//! directory and certificate, phones connected to it with the pin, and small
//! checks on what the node answered.
//!
//! Everything here talks to the node over QUIC; the ledger handle is used
//! only to audit the books after the fact.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tapledger_actors::Ledger;
use tapledger_node::config::{DataDir, NodeConfig};
use tapledger_node::init::init_data_dir;
use tapledger_node::{
    ApiCredentials, ClientEndpoint, ClientError, HalfAnswer, Phone, RunningNode, Submitted,
};
use tapledger_protocol::{
    AccountId, ErrorCode, OutcomeReport, OutcomeStatus, RejectCode, Secret, TxKey,
};
use tapledger_test_kit::wire;

use crate::support::{receive, send, within};

pub struct TestNode {
    pub node: RunningNode,
    pub admin: Secret,
    pub endpoint: ClientEndpoint,
    data_dir: DataDir,
    _dir: tempfile::TempDir,
}

impl TestNode {
    /// A node started the way `tapledger-node run` starts one, after
    /// `configure` (whose `ledger` is the whole ledger configuration).
    pub async fn start(configure: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = DataDir::new(dir.path().join("data"));
        init_data_dir(&data_dir, &["localhost".into(), "127.0.0.1".into()]).expect("init");
        let mut config = NodeConfig::new(data_dir.path(), "127.0.0.1:0".parse().unwrap());
        configure(&mut config);
        let node = within(RunningNode::start(config))
            .await
            .expect("start node");
        TestNode::around(node, &data_dir, dir)
    }

    fn around(node: RunningNode, data_dir: &DataDir, dir: tempfile::TempDir) -> TestNode {
        let admin = wire::admin_credential(data_dir.path());
        let endpoint =
            ClientEndpoint::new(node.fingerprint, node.local_addr).expect("client endpoint");
        TestNode {
            node,
            admin,
            endpoint,
            data_dir: data_dir.clone(),
            _dir: dir,
        }
    }

    /// Shuts the node down cleanly and starts it again on the same data
    /// directory (same certificate, same ledger file, a new port).
    pub async fn restart(self, configure: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let TestNode {
            node,
            data_dir,
            _dir: dir,
            ..
        } = self;
        within(node.shutdown(Duration::from_secs(5))).await;
        let mut config = NodeConfig::new(data_dir.path(), "127.0.0.1:0".parse().unwrap());
        configure(&mut config);
        // The ledger file is released when shutdown returns: no retry.
        let node = within(RunningNode::start(config))
            .await
            .expect("restart node on the same data directory");
        TestNode::around(node, &data_dir, dir)
    }

    /// A fresh connection with its request stream, not authenticated.
    pub async fn connect(&self) -> Phone {
        within(self.endpoint.connect(self.node.local_addr, "localhost"))
            .await
            .expect("connect")
    }

    /// Opens a funded account over the wire and returns a phone authenticated as it.
    pub async fn phone_with_account(
        &self,
        opening_balance: u64,
    ) -> (AccountId, Phone, ApiCredentials) {
        let opened = within(wire::open_account(
            &self.endpoint,
            self.node.local_addr,
            &self.admin,
            "checking",
            "Test Bank",
            opening_balance,
        ))
        .await
        .expect("open account");
        let phone = self.reconnect(opened.id, &opened.credentials).await;
        (opened.id, phone, opened.credentials)
    }

    /// A new connection authenticated as `account`: a phone coming back.
    pub async fn reconnect(&self, account: AccountId, credentials: &ApiCredentials) -> Phone {
        within(wire::authenticated_phone(
            &self.endpoint,
            self.node.local_addr,
            account,
            credentials,
        ))
        .await
        .expect("connect and authenticate")
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        self.node.ledger()
    }

    pub fn auth_failures(&self) -> u64 {
        self.node.counters().auth_failures.load(Ordering::Relaxed)
    }

    /// Waits until the node counts exactly `count` open connections.
    pub async fn wait_for_open_connections(&self, count: usize) {
        let counters = self.node.counters();
        within(async {
            while counters.connections_open.load(Ordering::Relaxed) != count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// The books add up: conservation, no negative balance, history agrees.
    pub fn assert_books(&self) {
        let report = self.ledger().audit().expect("audit");
        assert!(report.is_ok(), "audit problems: {:#?}", report.problems);
    }

    /// An honest payment between two new accounts settles: the node is still
    /// serving after whatever a test threw at it.
    pub async fn assert_still_settles(&self) {
        let (alice, alice_phone, _) = self.phone_with_account(300).await;
        let (bob, bob_phone, _) = self.phone_with_account(0).await;
        let tx_key = TxKey::new_random();
        let pending = accepted(within(alice_phone.submit(send(tx_key, alice, 120))).await);
        let bob_report = decided(within(bob_phone.submit(receive(tx_key, bob, alice, 120))).await);
        let alice_report = decided_later(pending).await;
        assert_eq!(bob_report.status, OutcomeStatus::Settled);
        assert_eq!(alice_report, report_for_other_party(&bob_report, 180));
        assert_eq!(within(alice_phone.balance()).await.unwrap(), 180);
        assert_eq!(within(bob_phone.balance()).await.unwrap(), 120);
        alice_phone.close().await;
        bob_phone.close().await;
        self.assert_books();
    }

    pub async fn stop(self) {
        within(self.node.shutdown(Duration::from_secs(5))).await;
    }
}

/// The same settled report as the other party sees it: identical but for the
/// viewer's own balance.
pub fn report_for_other_party(report: &OutcomeReport, balance_after: u64) -> OutcomeReport {
    OutcomeReport {
        balance_after: Some(balance_after),
        ..report.clone()
    }
}

/// The first answer was `accepted`: the half is durable and waits.
#[track_caller]
pub fn accepted(submitted: Result<Submitted, ClientError>) -> tapledger_node::client::PendingHalf {
    match submitted {
        Ok(Submitted::Accepted(pending)) => pending,
        other => panic!("expected the half to be accepted, got {other:?}"),
    }
}

/// The first answer was the key's outcome.
#[track_caller]
pub fn decided(submitted: Result<Submitted, ClientError>) -> OutcomeReport {
    match submitted {
        Ok(Submitted::Answered(HalfAnswer::Decided(report))) => report,
        other => panic!("expected an outcome at once, got {other:?}"),
    }
}

/// The first answer was `refused` with `code`.
#[track_caller]
pub fn refused(submitted: Result<Submitted, ClientError>, code: RejectCode) {
    match submitted {
        Ok(Submitted::Answered(HalfAnswer::Refused {
            code: got,
            explanation,
        })) => {
            assert_eq!(got, code, "refused with {got}: {explanation}");
            assert_eq!(explanation, code.explanation());
        }
        other => panic!("expected refusal {code}, got {other:?}"),
    }
}

/// The outcome pushed later on the stream the half was accepted on.
pub async fn decided_later(pending: tapledger_node::client::PendingHalf) -> OutcomeReport {
    match within(pending.answer()).await {
        Ok(HalfAnswer::Decided(report)) => report,
        other => panic!("expected a pushed outcome, got {other:?}"),
    }
}

/// The request failed with the node's protocol error `code`; returns the
/// node's message.
#[track_caller]
pub fn node_error<T: std::fmt::Debug>(result: Result<T, ClientError>, code: ErrorCode) -> String {
    match result {
        Err(ClientError::Node { code: got, message }) => {
            assert_eq!(got, code, "node answered {got:?}: {message}");
            assert!(message.starts_with(code.explanation()), "{message}");
            message
        }
        other => panic!("expected error {}, got {other:?}", code.code()),
    }
}

/// A rejection report with `code`, as the node records it.
#[track_caller]
pub fn assert_rejected(report: &OutcomeReport, tx_key: TxKey, code: RejectCode) {
    assert_eq!(report.tx_key, tx_key);
    assert_eq!(report.status, OutcomeStatus::Rejected);
    assert_eq!(report.code, Some(code));
    assert_eq!(report.explanation, code.explanation());
    assert_eq!(report.amount, None);
}

/// Waits until the node has closed `phone`'s connection and returns the QUIC
/// application close code it gave.
pub async fn closed_by_node(phone: &Phone) -> u64 {
    let reason = within(async {
        loop {
            if let Some(reason) = phone.close_reason() {
                return reason;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected the node to close the connection, got {other:?}"),
    }
}
