//! Export: a small ledger with one outcome of each kind is written as CSV and
//! read back with the csv crate; each row's fields are checked.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tapledger_actors::{Ledger, LedgerConfig, ManualClock, Resolution};
use tapledger_protocol::{Half, TxKey};
// The kit's protocol and actors layer only: its `wire` helpers name
// `tapledger_node` types, which are not this crate's own types here.
use tapledger_test_kit::{new_account_at, receive, send};

use super::*;

/// Node time at the start of the sample ledger: 2023-11-14T22:13:20Z.
pub(crate) const SAMPLE_START_MICROS: u64 = 1_700_000_000_000_000;

/// The keys of the sample ledger's four payments.
pub(crate) struct Sample {
    pub alice: AccountId,
    pub bob: AccountId,
    pub settled: TxKey,
    pub mismatched: TxKey,
    pub overdrawn: TxKey,
    pub expired: TxKey,
}

/// Submits both halves, each by its own party, and returns the outcome.
async fn pay(ledger: &Ledger, first: Half, second: Half) -> Resolution {
    let pending = ledger.submit(first.party(), first).await.unwrap();
    let decided = ledger.submit(second.party(), second).await.unwrap();
    let resolution = decided.resolution().await.unwrap();
    drop(pending);
    resolution
}

/// Builds a closed ledger file at `path`: alice (North Bank, 1000) pays bob
/// (South Bank, 0) 300; then an amount mismatch (300), an overdraft (100),
/// and a lone receive half that expires (500), one minute apart.
pub(crate) async fn sample_ledger(path: &Path) -> Sample {
    let clock = ManualClock::new(Timestamp::from_micros(SAMPLE_START_MICROS));
    let mut config = LedgerConfig::new(path);
    config.clock = Arc::new(clock.clone());
    config.half_ttl = Duration::from_secs(30);
    let ledger = Ledger::open(config).await.expect("open ledger");
    let alice = ledger
        .open_account(new_account_at("North Bank", 1_000))
        .await
        .unwrap();
    let bob = ledger
        .open_account(new_account_at("South Bank", 0))
        .await
        .unwrap();
    let sample = Sample {
        alice,
        bob,
        settled: TxKey::new_random(),
        mismatched: TxKey::new_random(),
        overdrawn: TxKey::new_random(),
        expired: TxKey::new_random(),
    };
    let settled = pay(
        &ledger,
        send(sample.settled, alice, 300),
        receive(sample.settled, bob, alice, 300),
    )
    .await;
    assert!(
        matches!(&settled, Resolution::Final(outcome) if outcome.is_settled()),
        "{settled:?}"
    );
    clock.advance(Duration::from_secs(60));
    pay(
        &ledger,
        send(sample.mismatched, alice, 100),
        receive(sample.mismatched, bob, alice, 150),
    )
    .await;
    clock.advance(Duration::from_secs(60));
    pay(
        &ledger,
        send(sample.overdrawn, alice, 5_000),
        receive(sample.overdrawn, bob, alice, 5_000),
    )
    .await;
    clock.advance(Duration::from_secs(60));
    let lone = ledger
        .submit(bob, receive(sample.expired, bob, alice, 50))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(31));
    assert_eq!(ledger.expire_now().await.unwrap(), 1);
    drop(lone);
    ledger.close().await;
    sample
}

fn exported(store: &Store, range: TimeRange) -> (ExportSummary, Vec<HashMap<String, String>>) {
    let mut bytes = Vec::new();
    let summary = export_csv(store, &mut bytes, range).unwrap();
    let mut reader = csv::Reader::from_reader(bytes.as_slice());
    let headers = reader.headers().unwrap().clone();
    assert_eq!(headers.iter().collect::<Vec<_>>(), COLUMNS.to_vec());
    let rows = reader
        .records()
        .map(|record| {
            let record = record.unwrap();
            headers
                .iter()
                .zip(record.iter())
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect()
        })
        .collect();
    (summary, rows)
}

#[tokio::test]
async fn export_writes_each_outcome_with_the_prototype_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let sample = sample_ledger(&path).await;
    let store = Store::open(&path).unwrap();
    let (summary, rows) = exported(&store, TimeRange::default());
    assert_eq!(
        summary,
        ExportSummary {
            settlements: 1,
            rejections: 3,
            skipped: 0
        }
    );
    let row = |key: TxKey| {
        rows.iter()
            .find(|row| row["transaction_key"] == key.to_string())
            .unwrap_or_else(|| panic!("no row for {key}"))
    };
    let (alice, bob) = (sample.alice.to_string(), sample.bob.to_string());

    let settled = row(sample.settled);
    assert_eq!(settled["outcome"], "settled");
    assert_eq!(settled["account_number_sender"], alice);
    assert_eq!(settled["account_number_receiver"], bob);
    assert_eq!(settled["transfer_amount"], "300");
    assert_eq!(
        settled["beginning_balance_sender"], "1000",
        "the sender's balance, not the receiver's"
    );
    assert_eq!(settled["bank_sender"], "North Bank");
    assert_eq!(settled["bank_receiver"], "South Bank");
    assert_eq!(settled["os_sender"], "ios 18");
    assert_eq!(settled["os_receiver"], "android 15");
    assert_eq!(settled["unanimous_agreement"], "true");
    assert_eq!(settled["transaction_error"], "false");
    assert_eq!(settled["error_code"], "");
    assert_eq!(settled["send_received_at"], "2023-11-14T22:13:20.000000Z");
    assert_eq!(
        settled["receive_received_at"],
        "2023-11-14T22:13:20.000000Z"
    );
    assert_eq!(settled["transaction_timestamp"], settled["settled_at"]);
    assert_eq!(settled["send_client_time"], "2023-11-14T22:13:20.000Z");

    let mismatched = row(sample.mismatched);
    assert_eq!(mismatched["error_code"], "300");
    assert_eq!(mismatched["transaction_error"], "true");
    assert_eq!(mismatched["unanimous_agreement"], "false");
    assert_eq!(
        mismatched["error_explanation"],
        "the two halves name different amounts"
    );

    let overdrawn = row(sample.overdrawn);
    assert_eq!(overdrawn["error_code"], "100");
    assert_eq!(overdrawn["unanimous_agreement"], "true");
    assert_eq!(overdrawn["beginning_balance_sender"], "700");

    let expired = row(sample.expired);
    assert_eq!(expired["error_code"], "500");
    assert_eq!(
        expired["account_number_sender"], alice,
        "the expected sender, not swapped"
    );
    assert_eq!(expired["account_number_receiver"], bob);
    assert_eq!(expired["transfer_amount"], "50");
    assert_eq!(expired["os_sender"], "");
    assert_eq!(expired["send_received_at"], "");
    assert_eq!(
        expired["receive_received_at"],
        "2023-11-14T22:16:20.000000Z"
    );
    assert_eq!(expired["settled_at"], "2023-11-14T22:16:51.000000Z");
}

#[tokio::test]
async fn export_filters_by_decision_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let sample = sample_ledger(&path).await;
    let store = Store::open(&path).unwrap();
    // The mismatch was decided at +60 s and the overdraft at +120 s.
    let range = TimeRange {
        from: Some(parse_time("2023-11-14T22:14:20Z").unwrap()),
        to: Some(parse_time("2023-11-14 22:15:20").unwrap()),
    };
    let (summary, rows) = exported(&store, range);
    assert_eq!(
        summary,
        ExportSummary {
            settlements: 0,
            rejections: 1,
            skipped: 3
        }
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["transaction_key"], sample.mismatched.to_string());
}

#[test]
fn times_parse_in_the_documented_forms() {
    let at = Timestamp::from_micros(SAMPLE_START_MICROS);
    assert_eq!(parse_time("2023-11-14T22:13:20Z").unwrap(), at);
    assert_eq!(parse_time("2023-11-14 22:13:20").unwrap(), at);
    assert_eq!(parse_time("1700000000").unwrap(), at);
    assert_eq!(
        parse_time("2023-11-14").unwrap(),
        Timestamp::from_micros(1_699_920_000_000_000)
    );
    assert!(parse_time("yesterday").is_err());
    assert!(parse_time("-5").is_err());
    assert_eq!(format_time(at), "2023-11-14T22:13:20.000000Z");
}

/// Issue 12: `--format parquet` writes the CSV's columns, with their types,
/// and the same values: read back, every row and column matches the CSV.
#[tokio::test]
async fn parquet_holds_the_csv_columns_with_their_types() {
    use parquet::basic::{ConvertedType, Type as PhysicalType};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let sample = sample_ledger(&path).await;
    let store = Store::open(&path).unwrap();
    let (_, csv_rows) = exported(&store, TimeRange::default());
    let file_path = dir.path().join("outcomes.parquet");
    let summary = export_parquet(
        &store,
        std::fs::File::create(&file_path).unwrap(),
        TimeRange::default(),
    )
    .unwrap();
    assert_eq!(summary.settlements + summary.rejections, 4);

    let reader = SerializedFileReader::new(std::fs::File::open(&file_path).unwrap()).unwrap();
    let schema = reader.metadata().file_metadata().schema_descr();
    let names: Vec<&str> = schema
        .columns()
        .iter()
        .map(|column| column.name())
        .collect();
    assert_eq!(names, COLUMNS.to_vec());
    let column = |name: &str| {
        schema
            .columns()
            .iter()
            .find(|column| column.name() == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        column("transfer_amount").physical_type(),
        PhysicalType::INT64
    );
    assert_eq!(
        column("transfer_amount").converted_type(),
        ConvertedType::UINT_64
    );
    assert_eq!(
        column("settled_at").converted_type(),
        ConvertedType::TIMESTAMP_MICROS
    );
    assert_eq!(
        column("unanimous_agreement").physical_type(),
        PhysicalType::BOOLEAN
    );
    assert_eq!(
        column("error_code").converted_type(),
        ConvertedType::UINT_16
    );

    let rows: Vec<parquet::record::Row> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| row.unwrap())
        .collect();
    assert_eq!(rows.len(), csv_rows.len());
    for (row, csv_row) in rows.iter().zip(&csv_rows) {
        for (name, field) in row.get_column_iter() {
            let as_text = match field {
                Field::Null => String::new(),
                Field::Str(text) => text.clone(),
                Field::Bool(value) => value.to_string(),
                Field::ULong(value) => value.to_string(),
                Field::UShort(value) => value.to_string(),
                Field::TimestampMicros(micros) => {
                    format_time(Timestamp::from_micros(u64::try_from(*micros).unwrap()))
                }
                Field::TimestampMillis(millis) => humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(*millis).unwrap()),
                )
                .to_string(),
                other => panic!("{name}: unexpected {other:?}"),
            };
            assert_eq!(as_text, csv_row[name.as_str()], "column {name}");
        }
    }
    // Typed, not text: the settlement's amount is a number, its code absent.
    let settled = rows
        .iter()
        .find(|row| {
            row.get_column_iter().any(|(name, field)| {
                name == "transaction_key" && *field == Field::Str(sample.settled.to_string())
            })
        })
        .expect("the settlement");
    let field = |name: &str| {
        settled
            .get_column_iter()
            .find(|(column, _)| column.as_str() == name)
            .map(|(_, field)| field.clone())
            .unwrap()
    };
    assert_eq!(field("transfer_amount"), Field::ULong(300));
    assert_eq!(field("error_code"), Field::Null);
    assert_eq!(field("transaction_error"), Field::Bool(false));
}
