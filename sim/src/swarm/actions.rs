//! Single actions for people trying tapledger by hand: open an account, make
//! one payment, run one named fault scenario and show what the node answered
//! at every step. Each works against an embedded node (started for the
//! command and discarded after it) or a node given with `--node`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tapledger_node::ClientError;
use tapledger_node::init::{hex, parse_hex};
use tapledger_protocol::{AccountId, Secret, Side, TxKey};
use tokio::time::Instant;

use super::phones::{SimPhone, Swarm};
use super::target::{Account, Connected, Connector, Target, open_accounts};
use super::workload::{Expect, Kind, Payment};

/// An account given on the command line: its id and API key.
#[derive(Clone, Debug)]
pub struct GivenAccount {
    pub id: AccountId,
    pub key: Secret,
}

impl GivenAccount {
    pub fn parse(id: AccountId, key_hex: &str) -> anyhow::Result<GivenAccount> {
        let key = parse_hex(key_hex.trim())
            .ok_or_else(|| anyhow!("the API key of account {id} is not hex"))?;
        Ok(GivenAccount {
            id,
            key: Secret::new(key),
        })
    }
}

/// What a single action printed and whether it went as it should.
pub struct ActionOutput {
    pub text: String,
    pub ok: bool,
}

/// Runs `body` against the target, then stops the embedded node if any.
async fn with_target<F, Fut>(
    target: &Target,
    step_timeout: Duration,
    body: F,
) -> anyhow::Result<ActionOutput>
where
    F: FnOnce(Arc<Connector>, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ActionOutput>>,
{
    let Connected {
        connector,
        embedded,
        label,
    } = target.connect(1, step_timeout).await?;
    let result = body(connector.clone(), label).await;
    connector.wait_idle().await;
    if let Some(embedded) = embedded.and_then(Arc::into_inner) {
        embedded.stop().await;
    }
    result
}

/// Opens one account with `balance` and prints its id and API key.
pub async fn open_account(
    target: &Target,
    balance: u64,
    step_timeout: Duration,
) -> anyhow::Result<ActionOutput> {
    let embedded = matches!(target, Target::Embedded { .. });
    with_target(target, step_timeout, |connector, label| async move {
        let accounts = open_accounts(&connector, &[balance], 1, false).await?;
        let account = &accounts[0];
        let mut text = String::new();
        let _ = writeln!(text, "opened on the {label}:");
        let _ = writeln!(text, "account_id {}", account.id);
        let _ = writeln!(text, "api_key    {}", hex(account.key.expose()));
        let _ = writeln!(text, "balance    {balance}");
        if embedded {
            let _ = writeln!(
                text,
                "(the embedded node is discarded when this command ends; pass --node ADDR \
                 --cert FILE --admin FILE to open an account on a running node)"
            );
        }
        Ok(ActionOutput { text, ok: true })
    })
    .await
}

/// What `pay` needs.
#[derive(Clone, Debug)]
pub struct PayRequest {
    pub from: Option<GivenAccount>,
    pub to: Option<GivenAccount>,
    pub amount: u64,
    /// Balance of accounts opened for the payment when `from`/`to` are not given.
    pub opening_balance: u64,
}

/// One payment between two accounts (opened on the fly unless given); prints
/// each phone's answer and both balances.
pub async fn pay(
    target: &Target,
    request: PayRequest,
    step_timeout: Duration,
) -> anyhow::Result<ActionOutput> {
    if request.amount == 0 {
        bail!("--amount must be at least 1");
    }
    with_target(target, step_timeout, |connector, label| async move {
        let mut text = String::new();
        let needed = usize::from(request.from.is_none()) + usize::from(request.to.is_none());
        let mut opened = if needed > 0 {
            let balances = vec![request.opening_balance; needed];
            let opened = open_accounts(&connector, &balances, 1, false)
                .await
                .context(
                    "opening accounts for the payment (give --from/--to to use existing ones)",
                )?;
            for account in &opened {
                let _ = writeln!(
                    text,
                    "opened account {} with {} (api_key {})",
                    account.id,
                    request.opening_balance,
                    hex(account.key.expose())
                );
            }
            opened.into_iter()
        } else {
            Vec::new().into_iter()
        };
        let mut account = |given: Option<GivenAccount>| -> Account {
            match given {
                Some(given) => Account {
                    id: given.id,
                    key: given.key,
                },
                None => opened.next().expect("opened above"),
            }
        };
        let accounts = vec![account(request.from), account(request.to)];
        let swarm = small_swarm(&connector, accounts).await?;
        let payment = single_payment(Kind::Normal, request.amount, 0);
        let _ = writeln!(text, "paying on the {label}, tx_key {}:", payment.tx_key);
        let result = swarm.execute(&payment, Instant::now()).await;
        text.push_str(&take_transcript(&swarm));
        let balances = balances_text(&swarm).await;
        text.push_str(&balances);
        let ok = result.settled;
        if !ok {
            let _ = writeln!(text, "the payment did not settle");
        }
        super::close_swarm(swarm).await;
        Ok(ActionOutput { text, ok })
    })
    .await
}

/// Runs one named fault scenario among fresh accounts and prints the
/// transcript, what the sim expected, and whether the node agreed.
pub async fn scenario(
    target: &Target,
    kind: Kind,
    step_timeout: Duration,
) -> anyhow::Result<ActionOutput> {
    with_target(target, step_timeout, |connector, label| async move {
        let opening = 100_000;
        let accounts = open_accounts(&connector, &[opening; 3], 1, false).await?;
        let swarm = small_swarm(&connector, accounts).await?;
        let mut text = String::new();
        let _ = writeln!(text, "scenario {}: {}", kind.name(), kind.description());
        let _ = writeln!(
            text,
            "on the {label}; three fresh accounts with {opening} each: phone 0 pays phone 1, phone 2 \
             is a bystander"
        );
        let mut payment = single_payment(kind, 2_500, 2);
        if kind == Kind::Overdraw {
            payment.amount = opening + 1_000;
            payment.expected_amount = payment.amount;
        }
        if kind == Kind::Expiry {
            let _ = writeln!(
                text,
                "(the node's half_ttl is {:.1} s: waiting for it)",
                swarm.session.half_ttl_ms as f64 / 1e3
            );
        }
        let result = swarm.execute(&payment, Instant::now()).await;
        text.push_str(&take_transcript(&swarm));
        let _ = writeln!(text, "expected vs answered:");
        let mut ok = true;
        for observation in &result.observations {
            ok &= observation.matches();
            if observation.matches() {
                let _ = writeln!(
                    text,
                    "  ok         {}: {}",
                    observation.role,
                    observation.got.describe()
                );
            } else {
                let _ = writeln!(
                    text,
                    "  DIFFERENT  {}: expected {}, got {}",
                    observation.role,
                    observation.expected.describe(),
                    observation.got.describe()
                );
            }
        }
        text.push_str(&balances_text(&swarm).await);
        let _ = writeln!(text, "result: {}", if ok { "as expected" } else { "NOT as expected" });
        super::close_swarm(swarm).await;
        Ok(ActionOutput { text, ok })
    })
    .await
}

/// Connects and authenticates one phone per account, with a transcript.
async fn small_swarm(
    connector: &Arc<Connector>,
    accounts: Vec<Account>,
) -> anyhow::Result<Arc<Swarm>> {
    let mut phones = Vec::with_capacity(accounts.len());
    let mut session = None;
    for (index, account) in accounts.into_iter().enumerate() {
        let (phone, this_session, replica) =
            connector.connect_phone(account.id, &account.key).await?;
        session.get_or_insert(this_session);
        phones.push(SimPhone::new(index, account, phone, replica));
    }
    Ok(Arc::new(Swarm {
        connector: connector.clone(),
        phones,
        session: session.ok_or_else(|| anyhow!("no account"))?,
        transcript: Some(Mutex::new(Vec::new())),
        failover: Default::default(),
        liveness: Default::default(),
    }))
}

/// A payment from phone 0 to phone 1; `third` names the bystander phone a
/// sender mismatch expects (or 0 when there is none).
fn single_payment(kind: Kind, amount: u64, third: u32) -> Payment {
    Payment {
        index: 0,
        kind,
        tx_key: TxKey::new_random(),
        sender: 0,
        receiver: 1,
        amount,
        expected_amount: if kind == Kind::AmountMismatch {
            amount + 100
        } else {
            amount
        },
        expected_sender: if kind == Kind::SenderMismatch {
            third
        } else {
            0
        },
        at_us: 0,
        send_delay_us: 0,
        receive_delay_us: 0,
        lone_side: Side::Send,
        by_query: true,
        epoch: 0,
    }
}

fn take_transcript(swarm: &Swarm) -> String {
    let lines = swarm
        .transcript
        .as_ref()
        .map(|transcript| std::mem::take(&mut *transcript.lock().expect("transcript lock")))
        .unwrap_or_default();
    lines.into_iter().map(|line| format!("{line}\n")).collect()
}

async fn balances_text(swarm: &Swarm) -> String {
    let mut text = String::from("balances now:");
    for (index, phone) in swarm.phones.iter().enumerate() {
        let shown = match swarm.balance(phone).await {
            Ok(balance) => balance.to_string(),
            Err(ClientError::Timeout(_)) => "(no answer)".to_owned(),
            Err(error) => format!("({error})"),
        };
        let _ = write!(
            text,
            " phone {index} (account {}) {shown};",
            phone.account.id
        );
    }
    text.pop();
    text.push('\n');
    text
}

/// Every scenario name with its description, for `scenario list`.
pub fn scenario_list() -> String {
    let mut text = String::new();
    for kind in Kind::ALL {
        let expected: Vec<String> = single_payment(kind, 1, 2)
            .expectations()
            .into_iter()
            .map(|(_, expect): (_, Expect)| expect.label())
            .collect();
        let _ = writeln!(
            text,
            "  {:<16} {} [{}]",
            kind.name(),
            kind.description(),
            expected.join(", ")
        );
    }
    text
}
