//! Payments against a running node with the Rust client: opens a payer and
//! a payee account with the operator's admin credential (the payer funded),
//! has each phone submit its own half, and prints the outcome and both
//! balances. `--payments N --pairs P` makes N payments over P concurrent
//! pairs and prints the rate: a smoke load for a fresh node.
//!
//! ```sh
//! cargo run -p tapledger-node --example pay -- \
//!     --node 127.0.0.1:7443 --cert tapledger-data/node.crt.pem \
//!     --admin tapledger-data/admin.key --amount 250
//! ```
//!
//! It pins the node's certificate by its SHA-256 fingerprint; it never
//! skips verification.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tapledger_certs::Fingerprint;
use tapledger_node::init::load_admin_credential;
use tapledger_node::{ApiCredentials, ClientEndpoint, HalfAnswer, Phone};
use tapledger_protocol::{AccountId, Half, OutcomeStatus, ReceiveHalf, SendHalf, TxKey};

#[derive(Parser)]
#[command(about = "Make payments between new accounts on a running node")]
struct Args {
    /// The node's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    node: SocketAddr,
    /// The node's certificate (pinned by fingerprint).
    #[arg(long, default_value = "tapledger-data/node.crt.pem")]
    cert: PathBuf,
    /// The operator's admin credential, to open the accounts.
    #[arg(long, default_value = "tapledger-data/admin.key")]
    admin: PathBuf,
    /// Minor units per payment.
    #[arg(long, default_value_t = 250)]
    amount: u64,
    /// Payments to make in all (a small smoke load when above 1).
    #[arg(long, default_value_t = 1)]
    payments: u64,
    /// Payer/payee pairs paying at the same time, each on its own phones.
    #[arg(long, default_value_t = 1)]
    pairs: u64,
}

/// Per-answer time limit.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

struct Pair {
    payer: AccountId,
    payee: AccountId,
    payer_phone: Phone,
    payee_phone: Phone,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.pairs >= 1 && args.payments >= 1,
        "--pairs and --payments must be at least 1"
    );
    let certificates = tapledger_certs::load_certificates(&args.cert)?;
    let certificate = certificates.first().context("no certificate in --cert")?;
    let endpoint = ClientEndpoint::new(Fingerprint::of(certificate), args.node)?;
    let admin = load_admin_credential(&args.admin)?;

    let per_pair = args.payments.div_ceil(args.pairs);
    let opening_balance = args.amount.saturating_mul(per_pair).saturating_mul(4);
    let operator = endpoint.connect(args.node, "localhost").await?;
    let mut pairs = Vec::new();
    for _ in 0..args.pairs {
        let payer_key = ApiCredentials::generate();
        let payee_key = ApiCredentials::generate();
        let payer = operator
            .open_account(
                &admin,
                "checking",
                "North Bank",
                &payer_key,
                opening_balance,
            )
            .await?;
        let payee = operator
            .open_account(&admin, "checking", "South Bank", &payee_key, 0)
            .await?;
        let mut payer_phone = endpoint.connect(args.node, "localhost").await?;
        payer_phone.authenticate(payer, &payer_key.key).await?;
        let mut payee_phone = endpoint.connect(args.node, "localhost").await?;
        payee_phone.authenticate(payee, &payee_key.key).await?;
        println!("opened accounts {payer} (balance {opening_balance}) and {payee} (balance 0)");
        pairs.push(Pair {
            payer,
            payee,
            payer_phone,
            payee_phone,
        });
    }
    operator.close().await;

    let started = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    let mut left = args.payments;
    for pair in pairs {
        let count = per_pair.min(left);
        left -= count;
        let (amount, verbose) = (args.amount, args.payments == 1);
        loops.spawn(async move {
            let mut settled = 0u64;
            for _ in 0..count {
                if pay_once(&pair, amount, verbose).await? {
                    settled += 1;
                }
            }
            let balances = (
                pair.payer_phone.balance().await?,
                pair.payee_phone.balance().await?,
            );
            println!(
                "balances: {} has {}, {} has {}",
                pair.payer, balances.0, pair.payee, balances.1
            );
            pair.payer_phone.close().await;
            pair.payee_phone.close().await;
            anyhow::Ok(settled)
        });
    }
    let mut settled = 0;
    while let Some(result) = loops.join_next().await {
        settled += result??;
    }
    let elapsed = started.elapsed();
    if args.payments > 1 {
        println!(
            "{settled} of {} payments settled in {:.2} s: {:.0} payments/s with {} pairs",
            args.payments,
            elapsed.as_secs_f64(),
            args.payments as f64 / elapsed.as_secs_f64(),
            args.pairs
        );
    }
    endpoint.wait_idle().await;
    Ok(())
}

/// One payment: the payer's phone sends its half, the payee's phone its
/// own; returns whether it settled.
async fn pay_once(pair: &Pair, amount: u64, verbose: bool) -> anyhow::Result<bool> {
    let tx_key = TxKey::new_random();
    let client_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let send = pair
        .payer_phone
        .submit(Half::Send(SendHalf {
            tx_key,
            sender_id: pair.payer,
            amount,
            device_os: "example".into(),
            client_time,
        }))
        .await?;
    let receive = pair
        .payee_phone
        .submit(Half::Receive(ReceiveHalf {
            tx_key,
            receiver_id: pair.payee,
            expected_sender_id: pair.payer,
            expected_amount: amount,
            device_os: "example".into(),
            client_time,
        }))
        .await?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, send.answer()).await??;
    tokio::time::timeout(ANSWER_TIMEOUT, receive.answer()).await??;
    let settled = match &answer {
        HalfAnswer::Decided(report) => {
            if verbose {
                println!(
                    "tx_key {tx_key}: {:?} ({})",
                    report.status, report.explanation
                );
            }
            report.status == OutcomeStatus::Settled
        }
        HalfAnswer::Refused { code, explanation } => {
            println!("tx_key {tx_key}: refused {code:?} ({explanation})");
            false
        }
    };
    Ok(settled)
}
