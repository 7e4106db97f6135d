//! Helpers shared by the integration tests: a ledger in a temporary directory,
//! funded accounts and half builders.

use std::time::Duration;

use tapledger_actors::{Ledger, LedgerConfig, NewAccount};
use tapledger_protocol::{AccountId, Half, ReceiveHalf, SendHalf, TxKey};

/// A ledger on a fresh temporary file. Keep the `TempDir` alive while it runs.
pub async fn temp_ledger(configure: impl FnOnce(&mut LedgerConfig)) -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = LedgerConfig::new(dir.path().join("ledger.redb"));
    configure(&mut config);
    let ledger = Ledger::open(config).await.expect("open ledger");
    (dir, ledger)
}

pub fn new_account(opening_balance: u64) -> NewAccount {
    NewAccount {
        account_type: "checking".into(),
        bank_name: "Test Bank".into(),
        salt: vec![7; 16],
        key_hash: vec![9; 64],
        opening_balance,
    }
}

pub async fn open_accounts(ledger: &Ledger, balances: &[u64]) -> Vec<AccountId> {
    let mut ids = Vec::new();
    for &balance in balances {
        ids.push(
            ledger
                .open_account(new_account(balance))
                .await
                .expect("open account"),
        );
    }
    ids
}

pub fn send(tx_key: TxKey, sender_id: AccountId, amount: u64) -> Half {
    Half::Send(SendHalf {
        tx_key,
        sender_id,
        amount,
        device_os: "ios 18".into(),
        client_time: 1_700_000_000_000,
    })
}

pub fn receive(
    tx_key: TxKey,
    receiver_id: AccountId,
    expected_sender_id: AccountId,
    expected_amount: u64,
) -> Half {
    Half::Receive(ReceiveHalf {
        tx_key,
        receiver_id,
        expected_sender_id,
        expected_amount,
        device_os: "android 15".into(),
        client_time: 1_700_000_000_001,
    })
}

/// Bounds every await in a test so a bug shows as a failure, not a hang.
pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("test step timed out")
}
