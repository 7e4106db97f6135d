//! Accounts opened directly on a `Ledger` (no node, no credentials that
//! anyone checks): a fixed salt and key hash, funded by the issuer.
//! Accounts opened over the wire, with credentials a phone authenticates
//! with, are in `wire` (feature `node`).

use tapledger_actors::{Ledger, NewAccount};
use tapledger_protocol::AccountId;

/// The bank [`new_account`] names.
pub const TEST_BANK: &str = "Test Bank";

/// A checking account at [`TEST_BANK`] funded with `opening_balance`.
pub fn new_account(opening_balance: u64) -> NewAccount {
    new_account_at(TEST_BANK, opening_balance)
}

/// A checking account at `bank` funded with `opening_balance`.
pub fn new_account_at(bank: &str, opening_balance: u64) -> NewAccount {
    NewAccount {
        account_type: "checking".into(),
        bank_name: bank.into(),
        salt: vec![7; 16],
        key_hash: vec![9; 64],
        opening_balance,
    }
}

/// Opens one [`new_account`] per balance, in order; returns their ids.
/// Each opening fails the test if it takes longer than [`crate::time::WAIT`]
/// (a stuck ledger fails the test instead of hanging it).
pub async fn open_accounts(ledger: &Ledger, balances: &[u64]) -> Vec<AccountId> {
    let mut ids = Vec::new();
    for &balance in balances {
        ids.push(
            crate::time::within(ledger.open_account(new_account(balance)))
                .await
                .expect("open account"),
        );
    }
    ids
}
