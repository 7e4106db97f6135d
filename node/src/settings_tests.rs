//! Precedence and parsing of settings, without touching the process
//! environment (clap's env layer is exercised by the binary's tests).

use super::*;

#[test]
fn defaults_let_a_node_start_with_nothing_configured() {
    let settings = Settings::resolve(
        GlobalLayer::default(),
        RunLayer::default(),
        FileSettings::default(),
    )
    .unwrap();
    assert_eq!(settings.global.data, PathBuf::from("tapledger-data"));
    assert_eq!(settings.run.listen, "127.0.0.1:7443".parse().unwrap());
    assert_eq!(
        settings.run.metrics_listen,
        HttpListen::At("127.0.0.1:9464".parse().unwrap())
    );
    assert_eq!(settings.run.half_ttl_secs, 300.0);
    assert_eq!(settings.global.log_format, LogFormat::Human);
}

#[test]
fn flags_beat_file_and_file_beats_defaults() {
    let file = FileSettings::parse(
        "data = \"/srv/ledger\"\nlisten = \"0.0.0.0:9000\"\nhalf_ttl_secs = 60\nlog_format = \"json\"\nmetrics_listen = \"off\"\n",
        "test.toml",
    )
    .unwrap();
    let flags = RunLayer {
        listen: Some("127.0.0.1:1234".parse().unwrap()),
        ..RunLayer::default()
    };
    let settings = Settings::resolve(GlobalLayer::default(), flags, file).unwrap();
    assert_eq!(settings.run.listen, "127.0.0.1:1234".parse().unwrap());
    assert_eq!(settings.run.half_ttl_secs, 60.0);
    assert_eq!(settings.global.data, PathBuf::from("/srv/ledger"));
    assert_eq!(settings.global.log_format, LogFormat::Json);
    assert_eq!(settings.run.metrics_listen, HttpListen::Off);
    assert_eq!(
        settings.run.max_amount,
        tapledger_actors::MAX_AMOUNT_DEFAULT
    );
}

#[test]
fn unknown_file_keys_are_errors_naming_the_key() {
    let error = FileSettings::parse("half_ttl = 5\n", "node.toml").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("half_ttl"), "{message}");
    assert!(message.contains("node.toml"), "{message}");
    assert!(
        message.contains("half_ttl_secs"),
        "lists known keys: {message}"
    );
}

#[test]
fn bad_values_are_refused() {
    let error = FileSettings::parse("listen = \"nowhere\"\n", "node.toml").unwrap_err();
    assert!(error.to_string().contains("node.toml"), "{error}");
    let file = FileSettings::parse("half_ttl_secs = -1\n", "node.toml").unwrap();
    let error = Settings::resolve(GlobalLayer::default(), RunLayer::default(), file).unwrap_err();
    assert!(error.to_string().contains("half_ttl_secs"), "{error}");
    let file = FileSettings::parse("log = \"[[[\"\n", "node.toml").unwrap();
    assert!(Settings::resolve(GlobalLayer::default(), RunLayer::default(), file).is_err());
    // Zero lone halves per account would refuse every first half (issue 12).
    let file = FileSettings::parse("pending_halves_per_account_max = 0\n", "node.toml").unwrap();
    let error = Settings::resolve(GlobalLayer::default(), RunLayer::default(), file).unwrap_err();
    assert!(
        error.to_string().contains("pending_halves_per_account_max"),
        "{error}"
    );
}

#[test]
fn resolved_settings_round_trip_through_a_file() {
    let flags = RunLayer {
        half_ttl_secs: Some(12.5),
        metrics_listen: Some(HttpListen::Off),
        ..RunLayer::default()
    };
    let settings =
        Settings::resolve(GlobalLayer::default(), flags, FileSettings::default()).unwrap();
    let again = Settings::resolve(
        GlobalLayer::default(),
        RunLayer::default(),
        FileSettings::parse(&settings.to_toml(), "printed").unwrap(),
    )
    .unwrap();
    assert_eq!(again, settings);
}

#[test]
fn unspecified_addresses_are_reached_over_loopback() {
    let file = FileSettings::parse(
        "listen = \"0.0.0.0:7443\"\nmetrics_listen = \"[::]:9464\"\n",
        "node.toml",
    )
    .unwrap();
    let settings = Settings::resolve(GlobalLayer::default(), RunLayer::default(), file).unwrap();
    assert_eq!(
        settings.local_quic_addr(),
        "127.0.0.1:7443".parse().unwrap()
    );
    assert_eq!(
        settings.local_http_addr(),
        Some("[::1]:9464".parse().unwrap())
    );
}

#[test]
fn bad_frames_max_is_a_setting_that_reaches_the_node() {
    // PROTOCOL.md names it a node setting (issue 12: it was refused as unknown).
    let file = FileSettings::parse("bad_frames_max = 10\n", "node.toml").unwrap();
    let settings = Settings::resolve(GlobalLayer::default(), RunLayer::default(), file).unwrap();
    assert_eq!(settings.node_config().limits.bad_frames_max, 10);
    assert!(settings.to_toml().contains("bad_frames_max = 10"));
    let zero = FileSettings::parse("bad_frames_max = 0\n", "node.toml").unwrap();
    let error = Settings::resolve(GlobalLayer::default(), RunLayer::default(), zero).unwrap_err();
    assert!(error.to_string().contains("bad_frames_max"), "{error}");
}

#[test]
fn flood_defenses_are_settings_that_reach_the_node() {
    // Issue 13: the attempt rate above which clients are validated, the
    // per-account connection cap and the busy deadline are settings like
    // any other, printed by `config` and checked.
    let defaults = Settings::resolve(
        GlobalLayer::default(),
        RunLayer::default(),
        FileSettings::default(),
    )
    .unwrap();
    let limits = defaults.node_config().limits;
    assert_eq!(limits.retry_above_attempts_per_sec, 2_000);
    assert_eq!(limits.connections_per_account_max, 16);
    assert_eq!(limits.busy_above_percent, 90);
    assert_eq!(limits.busy_first_request_timeout, Duration::from_secs(1));
    let printed = defaults.to_toml();
    for key in [
        "retry_above_attempts_per_sec = 2000",
        "connections_per_account_max = 16",
        "busy_above_percent = 90",
        "busy_first_request_timeout_secs = 1.0",
    ] {
        assert!(printed.contains(key), "{key} missing from:\n{printed}");
    }
    let file = FileSettings::parse(
        "retry_above_attempts_per_sec = 50\nconnections_per_account_max = 2\nbusy_above_percent = 75\nbusy_first_request_timeout_secs = 0.5\n",
        "node.toml",
    )
    .unwrap();
    let flags = RunLayer {
        connections_per_account_max: Some(3),
        ..RunLayer::default()
    };
    let limits = Settings::resolve(GlobalLayer::default(), flags, file)
        .unwrap()
        .node_config()
        .limits;
    assert_eq!(limits.retry_above_attempts_per_sec, 50);
    assert_eq!(limits.connections_per_account_max, 3, "the flag wins");
    assert_eq!(limits.busy_above_percent, 75);
    assert_eq!(
        limits.busy_first_request_timeout,
        Duration::from_millis(500)
    );
    for (bad, name) in [
        (
            "connections_per_account_max = 0",
            "connections_per_account_max",
        ),
        ("busy_above_percent = 0", "busy_above_percent"),
        ("busy_above_percent = 101", "busy_above_percent"),
        (
            "busy_first_request_timeout_secs = 0",
            "busy_first_request_timeout_secs",
        ),
        ("commit_interval_ms = 1001", "commit_interval_ms"),
    ] {
        let file = FileSettings::parse(bad, "node.toml").unwrap();
        let error =
            Settings::resolve(GlobalLayer::default(), RunLayer::default(), file).unwrap_err();
        assert!(error.to_string().contains(name), "{bad}: {error}");
    }
    // A percent that does not fit its type is a parse error naming the file.
    assert!(FileSettings::parse("busy_above_percent = 300", "node.toml").is_err());
}

#[test]
fn every_ledger_setting_reaches_the_node_config() {
    // Issue 11: `RunningNode::start` (the sim, the tests) must build exactly
    // the ledger `run` builds; the per-account pending cap and the account
    // idle time used to be settable only on a ledger opened by hand.
    let file = FileSettings::parse(
        "data = \"/srv/ledger\"\nhalf_ttl_secs = 7\nmax_amount = 1234\nmatcher_shards = 3\n\
         pending_halves_per_account_max = 5\naccount_idle_secs = 2.5\nheartbeat_ms = 70\n\
         live_accounts_max = 1000\nelection_timeout_ms = 650\nsnapshot_after_entries = 400\n\
         commit_interval_ms = 12\n",
        "node.toml",
    )
    .unwrap();
    let settings = Settings::resolve(GlobalLayer::default(), RunLayer::default(), file).unwrap();
    let ledger = settings.node_config().ledger;
    assert_eq!(ledger.path, PathBuf::from("/srv/ledger/ledger.redb"));
    assert_eq!(ledger.half_ttl, Duration::from_secs(7));
    assert_eq!(ledger.max_amount, 1234);
    assert_eq!(ledger.matcher_shards, 3);
    assert_eq!(ledger.pending_halves_per_account_max, 5);
    assert_eq!(ledger.account_idle, Duration::from_millis(2500));
    assert_eq!(ledger.live_accounts_max, 1000);
    assert_eq!(ledger.commit_interval_min, Duration::from_millis(12));
    assert_eq!(ledger.replication.heartbeat, Duration::from_millis(70));
    assert_eq!(
        ledger.replication.election_timeout,
        (Duration::from_millis(650), Duration::from_millis(1000))
    );
    assert_eq!(ledger.replication.snapshot_after_entries, 400);
    assert_eq!(ledger.replication.entries_kept_after_snapshot, 100);
}
