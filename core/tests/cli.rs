//! The command line and configuration errors as a user meets them: one line, the file, the key, the line,
//! exit status 2, nothing started.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

fn run(args: &[&str], yaml: Option<&str>) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.yaml");
    if let Some(yaml) = yaml {
        std::fs::write(&path, yaml).unwrap();
    }
    let mut command = Command::new(support::binary());
    if yaml.is_some() {
        command.arg("--config").arg(&path);
    }
    let output = command.args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).replace(&path.display().to_string(), "FILE");
    // A death by signal reads as the shell shows it (134 for SIGABRT), so a failed assertion says what happened.
    let code = output.status.code().or(output.status.signal().map(|signal| 128 + signal)).unwrap_or(-1);
    (code, String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
}

fn config_error(yaml: &str) -> String {
    config_error_with(&[], yaml)
}

fn config_error_with(args: &[&str], yaml: &str) -> String {
    let (code, _, stderr) = run(args, Some(yaml));
    assert_eq!(code, 2, "bad configuration exits 2: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
    stderr.trim_end().to_string()
}

#[test]
fn an_unknown_key_names_file_line_and_key() {
    let error = config_error("port: 8080\nconcurency: 4\nworker:\n  command: [./w]\n");
    assert!(error.starts_with("error: FILE:2: unknown key `concurency`, expected one of"), "{error}");
}

#[test]
fn wrong_types_and_bad_values_name_the_key() {
    assert!(config_error("port: eighty\n").starts_with("error: FILE:1: port: invalid type"));
    assert!(config_error("port: 70000\n").starts_with("error: FILE:1: port: invalid value: integer `70000`"));
    assert_eq!(
        config_error("port: 1\nconcurrency: 0\nworker:\n  command: [./w]\n"),
        "error: FILE:2: concurrency: must be at least 1, got 0"
    );
    assert_eq!(
        config_error("worker:\n  command: []\n"),
        "error: FILE:2: worker.command: must not be empty: give the program and its arguments as a list"
    );
    assert!(config_error("hardShutdownDelay: soon\nworker:\n  command: [./w]\n")
        .starts_with("error: FILE:1: hardShutdownDelay: \"soon\" is not a duration"));
    assert!(config_error("env:\n  A: [1, 2]\n").starts_with("error: FILE:2: env.A: invalid type: sequence"));
}

#[test]
fn a_missing_command_or_file_is_one_line() {
    assert_eq!(
        config_error("port: 1\n"),
        "error: FILE: worker.command is required in spawn mode (or give the command after `--`)"
    );
    let (code, _, stderr) = run(&["--config", "/nonexistent/cluster.yaml"], None);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim_end(), "error: /nonexistent/cluster.yaml: No such file or directory (os error 2)");
    let (code, _, stderr) = run(&["--concurrency", "0", "--", "./w"], None);
    assert_eq!((code, stderr.trim_end()), (2, "error: --concurrency: must be at least 1, got 0"));
}

#[test]
fn check_prints_the_effective_configuration_with_overrides() {
    let yaml = "port: 9000\nconcurrency: 3\nenv:\n  ROLE: 'w{index}'\nworker:\n  command: [./server, --fast]\n";
    let (code, stdout, stderr) = run(&["--check", "--port", "9100", "--hard-shutdown-delay", "5s"], Some(yaml));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("port: 9100\n"), "{stdout}");
    assert!(stdout.contains("concurrency: 3\n"));
    assert!(stdout.contains("hardShutdownDelay: 5000\n"));
    assert!(stdout.contains("  \"ROLE\": \"w{index}\"\n"));
    assert!(stdout.contains("command: [\"./server\", \"--fast\"]"));
    assert!(stderr.contains("FILE: configuration is valid"));
    // What --check prints is itself a valid configuration.
    let (code, _, stderr) = run(&["--check"], Some(&stdout));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_worker_program_that_does_not_exist_is_one_line_exit_1() {
    let (code, _, stderr) = run(&["--port", "0", "--concurrency", "2", "--", "/nonexistent/worker"], None);
    assert_eq!(code, 1);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors, ["error: cannot start worker 0 (/nonexistent/worker): No such file or directory (os error 2)"]);
}

#[test]
fn concurrency_and_hard_shutdown_delay_have_upper_bounds_in_the_file_and_the_flags() {
    // 4000000000 workers used to abort the master (exit 134, an allocation failure) after it bound the port.
    let worker = "worker:\n  command: [/bin/true]\n";
    assert_eq!(
        config_error(&format!("port: 0\n\nconcurrency: 4000000000\n{worker}")),
        "error: FILE:3: concurrency: must be at most 1024, got 4000000000"
    );
    // --check: the same validation, and a master that accepted the value would run until killed.
    assert_eq!(
        config_error_with(&["--check"], &format!("port: 0\nconcurrency: 1\nhardShutdownDelay: 2147483648\n{worker}")),
        "error: FILE:3: hardShutdownDelay: must be at most 2147483647, got 2147483648"
    );
    // Nested keys keep their line too.
    assert_eq!(
        config_error_with(&["--check"], &format!("port: 0\nqueue:\n  maxWait: 5s\n  limit: 0\n{worker}")),
        "error: FILE:4: queue.limit: must be at least 1, got 0"
    );
    for (args, expected) in [
        (&["--concurrency", "4000000000"][..], "error: --concurrency: must be at most 1024, got 4000000000"),
        (&["--concurrency", "1025"][..], "error: --concurrency: must be at most 1024, got 1025"),
        (
            &["--check", "--concurrency", "1", "--hard-shutdown-delay", "2147483648"][..],
            "error: --hard-shutdown-delay: must be at most 2147483647, got 2147483648",
        ),
    ] {
        let args: Vec<&str> = args.iter().copied().chain(["--port", "0", "--", "/bin/true"]).collect();
        let (code, _, stderr) = run(&args, None);
        assert_eq!((code, stderr.trim_end()), (2, expected), "{args:?}");
    }
    // The bounds themselves are accepted.
    let (code, _, stderr) =
        run(&["--check", "--concurrency", "1024", "--hard-shutdown-delay", "2147483647", "--", "/bin/true"], None);
    assert_eq!(code, 0, "{stderr}");
    // A flag that fixes the file's value wins, as every override does.
    let (code, _, stderr) = run(&["--check", "--concurrency", "2"], Some(&format!("concurrency: 1024\n{worker}")));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_ready_fd_that_cannot_take_lines_is_one_line_and_exit_2() {
    let yaml = "port: 0\nconcurrency: 1\nworker:\n  command: [/bin/true]\n";
    assert_eq!(
        config_error_with(&["--ready-fd", "97"], yaml),
        "error: --ready-fd 97: not an open file descriptor (Bad file descriptor (os error 9))"
    );
    // stdin is /dev/null here, open for reading only.
    let (code, _, stderr) = run(&["--ready-fd", "0"], Some(yaml));
    assert_eq!((code, stderr.trim_end()), (2, "error: --ready-fd 0: open for reading only"));
    // From the environment, as from the flag; clap's own usage error for a value that is no number.
    let output = Command::new(support::binary())
        .args(["--port", "0", "--", "/bin/true"])
        .env("STICKY_CLUSTER_READY_FD", "ready")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.starts_with("error: invalid value 'ready' for '--ready-fd <FD>': not an fd number"), "{stderr}");
    // --check does not look at the fd (an upgrade's preflight runs with the master's arguments).
    let (code, _, stderr) = run(&["--check", "--ready-fd", "97"], Some(yaml));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_bad_file_is_also_an_error_line_on_the_ready_fd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, "concurrency: 0\n").unwrap();
    let ready = dir.path().join("ready");
    let file = std::fs::File::create(&ready).unwrap();
    use std::os::unix::process::CommandExt;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut command = Command::new(support::binary());
    command.arg("--config").arg(&path).args(["--ready-fd", &fd.to_string()]);
    // SAFETY: fcntl is async-signal-safe; the child runs nothing else before exec.
    unsafe {
        command.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines = std::fs::read_to_string(&ready).unwrap();
    let line: serde_json::Value = serde_json::from_str(lines.trim()).unwrap();
    assert_eq!((&line["version"], &line["event"]), (&1.into(), &"error".into()), "{lines}");
    assert_eq!(format!("error: {}", line["message"].as_str().unwrap()), stderr.trim_end());
}
