//! One payment against a running node with the Rust client: opens two
//! accounts with the operator's admin credential (the payer funded), makes
//! the payer's phone and the payee's phone each submit their half, and prints
//! the outcome and both balances.
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
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tapledger_certs::Fingerprint;
use tapledger_node::init::load_admin_credential;
use tapledger_node::{ApiCredentials, ClientEndpoint, HalfAnswer};
use tapledger_protocol::{Half, ReceiveHalf, SendHalf, TxKey};

#[derive(Parser)]
#[command(about = "Make one payment between two new accounts on a running node")]
struct Args {
    /// The node's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    node: SocketAddr,
    /// The node's certificate (pinned by fingerprint).
    #[arg(long, default_value = "tapledger-data/node.crt.pem")]
    cert: PathBuf,
    /// The operator's admin credential, to open the two accounts.
    #[arg(long, default_value = "tapledger-data/admin.key")]
    admin: PathBuf,
    /// Minor units to pay.
    #[arg(long, default_value_t = 250)]
    amount: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let certificates = tapledger_certs::load_certificates(&args.cert)?;
    let certificate = certificates.first().context("no certificate in --cert")?;
    let endpoint = ClientEndpoint::new(Fingerprint::of(certificate), args.node)?;
    let admin = load_admin_credential(&args.admin)?;
    let deadline = Duration::from_secs(30);

    let operator = endpoint.connect(args.node, "localhost").await?;
    let payer_key = ApiCredentials::generate();
    let payee_key = ApiCredentials::generate();
    let payer = operator
        .open_account(
            &admin,
            "checking",
            "North Bank",
            &payer_key,
            args.amount * 4,
        )
        .await?;
    let payee = operator
        .open_account(&admin, "checking", "South Bank", &payee_key, 0)
        .await?;
    operator.close().await;
    println!(
        "opened accounts {payer} (balance {}) and {payee} (balance 0)",
        args.amount * 4
    );

    let mut payer_phone = endpoint.connect(args.node, "localhost").await?;
    payer_phone.authenticate(payer, &payer_key.key).await?;
    let mut payee_phone = endpoint.connect(args.node, "localhost").await?;
    payee_phone.authenticate(payee, &payee_key.key).await?;

    let tx_key = TxKey::new_random();
    let client_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let send = payer_phone
        .submit(Half::Send(SendHalf {
            tx_key,
            sender_id: payer,
            amount: args.amount,
            device_os: "example".into(),
            client_time,
        }))
        .await?;
    let receive = payee_phone
        .submit(Half::Receive(ReceiveHalf {
            tx_key,
            receiver_id: payee,
            expected_sender_id: payer,
            expected_amount: args.amount,
            device_os: "example".into(),
            client_time,
        }))
        .await?;
    let answer = tokio::time::timeout(deadline, send.answer()).await??;
    tokio::time::timeout(deadline, receive.answer()).await??;
    match answer {
        HalfAnswer::Decided(report) => println!(
            "tx_key {tx_key}: {:?} ({})",
            report.status, report.explanation
        ),
        HalfAnswer::Refused { code, explanation } => {
            println!("tx_key {tx_key}: refused {code:?} ({explanation})")
        }
    }
    println!(
        "balances: {payer} has {}, {payee} has {}",
        payer_phone.balance().await?,
        payee_phone.balance().await?
    );
    payer_phone.close().await;
    payee_phone.close().await;
    endpoint.wait_idle().await;
    Ok(())
}
