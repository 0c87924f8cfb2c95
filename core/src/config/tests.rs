//! Tests of the configuration: file, overrides, defaults and the one-line errors.

use super::*;

fn error_of(yaml: &str) -> String {
    Config::from_yaml(yaml, "cluster.yaml").unwrap_err().to_string()
}

#[test]
fn a_full_file_sets_every_option() {
    let config = Config::from_yaml(
        "port: 9000\nhost: 127.0.0.1\nconcurrency: 3\ndebug: true\nprefix: 'app:'\nhardShutdownDelay: 5s\n\
         env:\n  ROLE: 'web-{index}'\n  LIMIT: 5\nworker:\n  command: [./server, --fast]\n  cwd: /srv\n\
         queue:\n  limit: 10\n  maxWait: 250\n",
        "cluster.yaml",
    )
    .unwrap();
    assert_eq!(config.port, 9000);
    assert_eq!(config.host, "127.0.0.1");
    assert_eq!(config.concurrency, 3);
    assert!(config.debug);
    assert_eq!(config.prefix, "app:");
    assert_eq!(config.hard_shutdown_delay, Duration::from_secs(5));
    assert_eq!(config.env["ROLE"], "web-{index}");
    assert_eq!(config.env["LIMIT"], "5");
    assert_eq!(
        config.workers,
        WorkerSource::Spawn { command: vec!["./server".into(), "--fast".into()], cwd: Some("/srv".into()) }
    );
    assert_eq!(config.queue_limit, 10);
    assert_eq!(config.queue_max_wait, Duration::from_millis(250));
}

#[test]
fn hard_shutdown_delay_takes_milliseconds_or_duration_text() {
    for (text, ms) in [("1500", 1500), ("'1500ms'", 1500), ("60s", 60_000), ("2m", 120_000)] {
        let config = Config::from_yaml(&format!("hardShutdownDelay: {text}"), "f").unwrap();
        assert_eq!(config.hard_shutdown_delay, Duration::from_millis(ms), "{text}");
    }
    assert!(error_of("hardShutdownDelay: soon").contains("hardShutdownDelay"));
    assert!(error_of("hardShutdownDelay: -5").contains("negative"));
}

#[test]
fn errors_name_the_file_the_line_and_the_key() {
    let unknown = error_of("port: 80\nconcurency: 4\n");
    assert!(unknown.starts_with("cluster.yaml:2: "), "{unknown}");
    assert!(unknown.contains("unknown key `concurency`"), "{unknown}");

    let zero = error_of("port: 80\n\nconcurrency: 0\n");
    assert!(zero.starts_with("cluster.yaml:3: concurrency: must be at least 1"), "{zero}");

    let port = error_of("port: 70000\n");
    assert!(port.starts_with("cluster.yaml:1: port: "), "{port}");
    assert!(port.contains("70000"), "{port}");

    let wrong_type = error_of("debug: maybe\n");
    assert!(wrong_type.starts_with("cluster.yaml:1: debug: "), "{wrong_type}");

    let empty = error_of("worker:\n  command: []\n");
    assert!(empty.starts_with("cluster.yaml:2: worker.command: must not be empty"), "{empty}");

    assert!(!unknown.contains('\n') && !zero.contains('\n') && !empty.contains('\n'));
}

#[test]
fn spawn_mode_needs_a_command_from_the_file_or_the_command_line() {
    let config = Config::from_yaml("port: 1\n", "c.yaml").unwrap();
    let missing = config.clone().apply(Overrides::default(), "c.yaml").unwrap_err().to_string();
    assert_eq!(missing, "c.yaml: worker.command is required in spawn mode (or give the command after `--`)");
    let overrides = Overrides { command: vec!["./w".into()], port: Some(2), ..Default::default() };
    let config = config.apply(overrides, "c.yaml").unwrap();
    assert_eq!(config.port, 2);
}

#[test]
fn attach_mode_reads_socket_mode_and_uids() {
    let config = Config::from_yaml(
        "workers:\n  socket: /run/sc/workers.sock\n  mode: \"0660\"\n  allowUids: [1000, 1001]\n",
        "f",
    )
    .unwrap();
    assert_eq!(
        config.workers,
        WorkerSource::Attach(AttachOptions {
            socket: "/run/sc/workers.sock".into(),
            mode: 0o660,
            allow_uids: vec![1000, 1001]
        })
    );
    assert!(error_of("workers:\n  socket: /x\n  mode: rw\n").contains("mode"));
}

#[test]
fn the_socket_mode_is_the_octal_it_says_or_refused() {
    let mode_of = |text: &str| match Config::from_yaml(&format!("workers:\n  socket: /x\n  mode: {text}\n"), "f") {
        Ok(Config { workers: WorkerSource::Attach(attach), .. }) => Ok(attach.mode),
        Ok(_) => panic!("attach mode expected"),
        Err(error) => Err(error.to_string()),
    };
    for text in ["0o660", "0660", "\"0660\"", "'0o660'"] {
        assert_eq!(mode_of(text), Ok(0o660), "{text}");
    }
    assert_eq!(mode_of("0o600"), Ok(0o600));
    assert_eq!(mode_of("\"0000\""), Ok(0));
    for text in ["660", "432", "0x1b0", "\"\"", "0o", "0o1777", "04755", "0668", "-0660", "6.6"] {
        let error = mode_of(text).unwrap_err();
        assert!(error.starts_with("f:3: workers.mode: "), "{text}: {error}");
    }
    assert!(mode_of("660").unwrap_err().contains("write it as \"0660\" or 0o660"));
}

#[test]
fn trusted_proxies_are_required_behind_a_proxy_and_checked() {
    let needs = |yaml: &str| Config::from_yaml(yaml, "c.yaml").unwrap().apply(command(), "c.yaml");
    let error = needs("clientAddress: proxy-protocol\n").unwrap_err().to_string();
    assert!(error.starts_with("c.yaml: trustedProxies is required when clientAddress is proxy-protocol"), "{error}");
    assert!(needs("clientAddress: x-forwarded-for\n").unwrap_err().to_string().contains("trustedProxies"));
    let config =
        needs("clientAddress: proxy-protocol\ntrustedProxies: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7]\n").unwrap();
    assert_eq!(config.trusted_proxies.0.len(), 3);
    assert!(config.trusted_proxies.contains("::ffff:10.9.8.7".parse().unwrap()));
    // The flag replaces the file's list and satisfies the requirement.
    let overrides = Overrides { trusted_proxies: vec!["127.0.0.1".parse().unwrap()], ..command() };
    let config = Config::from_yaml("clientAddress: proxy-protocol\n", "c.yaml").unwrap().apply(overrides, "c.yaml");
    assert_eq!(config.unwrap().trusted_proxies.0, vec!["127.0.0.1/32".parse::<Cidr>().unwrap()]);
    let bad = error_of("trustedProxies:\n  - 10.0.0.0/8\n  - 10.1.2.3/16\n");
    assert!(bad.starts_with("cluster.yaml:3: trustedProxies[1]: \"10.1.2.3/16\" has host bits set"), "{bad}");
    assert!(error_of("trustedProxies: [nowhere]\n").contains("not an address block"));
    assert!(error_of("headerWait:\n  limit: 0\n").contains("headerWait.limit: must be at least 1"));
}

fn command() -> Overrides {
    Overrides { command: vec!["./w".into()], ..Overrides::default() }
}

#[test]
fn default_host_falls_back_to_ipv4_any() {
    let config = Config { port: 80, ..Config::default() };
    let addresses = config.listen_addresses().unwrap();
    assert_eq!(addresses, vec!["[::]:80".parse().unwrap(), "0.0.0.0:80".parse().unwrap()]);
}

#[test]
fn queue_per_source_is_read_defaulted_and_at_least_one() {
    assert_eq!(Config::from_yaml("queue:\n  perSource: 16\n", "f").unwrap().queue_per_source, 16);
    assert_eq!(Config::default().queue_per_source, 1024);
    assert!(Config::default().to_yaml().contains("  perSource: 1024\n"));
    let zero = error_of("queue:\n  perSource: 0\n");
    assert!(zero.starts_with("cluster.yaml:2: queue.perSource: must be at least 1"), "{zero}");
}

#[test]
fn validate_holds_the_bounds_for_every_front_end() {
    let valid = Config { workers: WorkerSource::Spawn { command: vec!["./w".into()], cwd: None }, ..Config::default() };
    assert_eq!(valid.validate(), Ok(()));
    assert!(valid.concurrency >= defaults::MIN_CONCURRENCY && valid.concurrency <= defaults::MAX_CONCURRENCY);
    let refused = |config: Config| config.validate().unwrap_err();
    let error = refused(Config { concurrency: 4_000_000_000, ..valid.clone() });
    assert_eq!(
        (error.key, error.to_string().as_str()),
        ("concurrency", "concurrency: must be at most 1024, got 4000000000")
    );
    assert_eq!(
        error.naming("sticky_options.concurrency"),
        "sticky_options.concurrency: must be at most 1024, got 4000000000"
    );
    assert_eq!(
        refused(Config { concurrency: 0, ..valid.clone() }).to_string(),
        "concurrency: must be at least 1, got 0"
    );
    assert_eq!(Config { concurrency: 1024, ..valid.clone() }.validate(), Ok(()));
    let delay = |ms| Config { hard_shutdown_delay: Duration::from_millis(ms), ..valid.clone() };
    assert_eq!(delay(2_147_483_647).validate(), Ok(()));
    assert_eq!(delay(0).validate(), Ok(()));
    assert_eq!(
        refused(delay(2_147_483_648)).to_string(),
        "hardShutdownDelay: must be at most 2147483647, got 2147483648"
    );
    let max_wait = |ms| Config { queue_max_wait: Duration::from_millis(ms), ..valid.clone() };
    assert_eq!(max_wait(2_147_483_647).validate(), Ok(()));
    assert_eq!(
        refused(max_wait(2_147_483_648)).to_string(),
        "queue.maxWait: must be at most 2147483647, got 2147483648"
    );
    assert_eq!(refused(Config { backlog: 0, ..valid.clone() }).key, "backlog");
    assert_eq!(refused(Config { queue_limit: 0, ..valid.clone() }).key, "queue.limit");
    assert_eq!(refused(Config { header_wait_limit: 0, ..valid.clone() }).key, "headerWait.limit");
    assert_eq!(refused(Config { header_wait_max_wait: Duration::ZERO, ..valid.clone() }).key, "headerWait.maxWait");
    let kernel =
        Config { routing: Routing::Kernel, client_address: ClientAddressSource::ProxyProtocol, ..valid.clone() };
    assert_eq!(refused(kernel).key, "clientAddress");
    let no_command = Config { workers: WorkerSource::Spawn { command: vec![" ".into()], cwd: None }, ..valid };
    assert_eq!(
        refused(no_command).naming("sticky_options.worker_command"),
        "sticky_options.worker_command is required in spawn mode (or give the command after `--`)"
    );
}

#[test]
fn a_value_out_of_bounds_names_the_line_of_its_key_in_any_yaml_style() {
    assert_eq!(
        error_of("# comment\nconcurrency: 4000000000\n"),
        "cluster.yaml:2: concurrency: must be at most 1024, got 4000000000"
    );
    assert_eq!(
        error_of("port: 1\nqueue: {maxWait: 5, limit: 0}\n"),
        "cluster.yaml:2: queue.limit: must be at least 1, got 0"
    );
    assert_eq!(
        error_of("headerWait:\n  limit: 3\n  maxWait:\n    0\n"),
        "cluster.yaml:4: headerWait.maxWait: must be more than 0"
    );
    assert_eq!(
        error_of("concurrency: 5000000000\n"),
        "cluster.yaml:1: concurrency: 5000000000 is too large (at most 4294967295)"
    );
    assert_eq!(file::line_of("a: 1\nb:\n  c: 2\n", "b.c"), Some(3));
    assert_eq!(file::line_of("a: 1\nb:\n  c: 2\n", "b.d"), None);
    assert_eq!(file::line_of("a: 1\nb: [1, 2]\n", "b.c"), None);
    assert_eq!(file::line_of("", "a"), None);
}
