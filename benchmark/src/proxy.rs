//! The proxies users put in front of one worker per port instead of a sticky master: nginx `ip_hash` (http
//! upstream, as in socket.io's "Using multiple nodes" guide) and HAProxy `balance source` in TCP mode.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::handoff::Programs;
use crate::load;
use crate::procs::{self, Running};

/// A proxy in front of workers that each listen on their own port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// nginx, http module, `upstream { ip_hash; }`, with the upgrade headers a websocket needs.
    NginxIpHash,
    /// HAProxy, `mode tcp`, `balance source`.
    HaproxySource,
}

impl Proxy {
    /// The program's name (Debian installs both in /usr/sbin).
    pub fn program(self) -> &'static str {
        match self {
            Proxy::NginxIpHash => "nginx",
            Proxy::HaproxySource => "haproxy",
        }
    }

    /// Where the program is, or why it cannot be used.
    pub fn find(self) -> Result<PathBuf, String> {
        let name = self.program();
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| format!("{name} is not installed (bash benchmark/ensure-proxies.sh installs it)"))
    }

    /// `nginx -v` / `haproxy -v`, first line, for the report.
    pub fn version(self) -> Option<String> {
        let output = Command::new(self.find().ok()?).arg("-v").output().ok()?;
        // nginx prints its version on stderr, HAProxy on stdout.
        let text = [output.stdout, output.stderr].concat();
        String::from_utf8_lossy(&text).lines().next().map(|l| l.trim().to_string())
    }

    /// The configuration file for a proxy listening on 127.0.0.1:`port` in front of `workers` (ports), with
    /// every path it writes inside `dir`.
    pub fn config(self, dir: &Path, port: u16, workers: &[u16]) -> String {
        let mut text = String::new();
        match self {
            Proxy::NginxIpHash => {
                let d = dir.display();
                // worker_processes auto and the rest at their defaults: what a user gets from the package. A
                // keepalive_timeout of 0 closes each client connection after its reply, as the workers do.
                let _ = writeln!(text, "daemon off;\nmaster_process on;\nworker_processes auto;");
                // The error log goes to stderr, which the guard keeps: its tail explains errors and moved clients.
                let _ = writeln!(text, "pid {d}/nginx.pid;\nerror_log stderr warn;");
                let _ = writeln!(text, "events {{ worker_connections 1024; }}");
                let _ = writeln!(text, "http {{\n    access_log off;\n    keepalive_timeout 0;");
                for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    let _ = writeln!(text, "    {kind}_temp_path {d}/{kind};");
                }
                let _ = writeln!(text, "    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}");
                let _ = writeln!(text, "    upstream workers {{\n        ip_hash;");
                for worker in workers {
                    let _ = writeln!(text, "        server 127.0.0.1:{worker};");
                }
                let _ = writeln!(text, "    }}\n    server {{\n        listen 127.0.0.1:{port};");
                let _ = writeln!(text, "        location / {{\n            proxy_pass http://workers;");
                let _ = writeln!(text, "            proxy_http_version 1.1;");
                let _ = writeln!(text, "            proxy_set_header Upgrade $http_upgrade;");
                let _ = writeln!(text, "            proxy_set_header Connection $connection_upgrade;");
                let _ = writeln!(text, "            proxy_read_timeout 600s;\n        }}\n    }}\n}}");
            }
            Proxy::HaproxySource => {
                // No maxconn: HAProxy derives it from the open-file limit, which a fixed figure could exceed.
                let _ = writeln!(text, "global\n");
                let _ = writeln!(text, "defaults\n    mode tcp\n    timeout connect 5s");
                let _ = writeln!(text, "    timeout client 600s\n    timeout server 600s\n");
                let _ = writeln!(text, "frontend clients\n    bind 127.0.0.1:{port}\n    default_backend workers\n");
                let _ = writeln!(text, "backend workers\n    balance source");
                for (index, worker) in workers.iter().enumerate() {
                    let _ = writeln!(text, "    server w{index} 127.0.0.1:{worker}");
                }
            }
        }
        text
    }

    /// Starts the proxy on 127.0.0.1:`port` and `concurrency` Rust tokio workers (the no-master row's worker),
    /// each on a port of its own with its index in BENCH_WORKER_INDEX. The workers answer before the proxy
    /// starts; the proxy is the guard's first process, so its CPU and memory are what the master columns show.
    pub fn start(self, programs: &Programs, port: u16, concurrency: u32, label: &str) -> Result<Running, String> {
        let program = self.find()?;
        let dir = std::env::temp_dir().join(format!("sticky-cluster-bench-{}-{}", std::process::id(), self.program()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let workers = (0..concurrency).map(|_| procs::free_port()).collect::<Result<Vec<u16>, String>>()?;
        let (file, mut command) = match self {
            Proxy::NginxIpHash => {
                let file = dir.join("nginx.conf");
                let mut command = Command::new(&program);
                // -e: the error log before the configuration is read, so nothing is opened under /var/log.
                command.arg("-p").arg(&dir).arg("-e").arg("stderr").arg("-c").arg(&file);
                (file, command)
            }
            Proxy::HaproxySource => {
                let file = dir.join("haproxy.cfg");
                let mut command = Command::new(&program);
                command.arg("-db").arg("-f").arg(&file);
                (file, command)
            }
        };
        std::fs::write(&file, self.config(&dir, port, &workers))
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        let mut running: Option<Running> = None;
        for (index, worker_port) in workers.iter().enumerate() {
            let mut worker = Command::new(&programs.bench);
            worker
                .args(["worker", "--style", "tokio", "--direct-port", &worker_port.to_string()])
                .env("BENCH_WORKER_INDEX", index.to_string());
            match running.as_mut() {
                None => running = Some(Running::spawn(label, &mut worker)?),
                Some(running) => running.add(&mut worker)?,
            }
        }
        let mut running = running.ok_or("concurrency must be at least 1")?;
        running.remove_on_stop(dir);
        // Every worker answers before the proxy starts: a connection refused by a worker still starting makes
        // nginx mark it down for fail_timeout (10 s) and send its clients to another one meanwhile.
        for worker_port in &workers {
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, *worker_port));
            load::wait_until_answering(address, Duration::from_secs(30))?;
        }
        running.add_first(&mut command)?;
        Ok(running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_config_names_every_worker_and_hashes_by_address() {
        let text = Proxy::NginxIpHash.config(Path::new("/tmp/x"), 8080, &[9001, 9002]);
        assert!(text.contains("ip_hash;"));
        assert!(text.contains("server 127.0.0.1:9001;") && text.contains("server 127.0.0.1:9002;"));
        assert!(text.contains("listen 127.0.0.1:8080;"));
        assert!(text.contains("pid /tmp/x/nginx.pid;") && text.contains("error_log stderr"));
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn haproxy_config_is_tcp_mode_balance_source() {
        let text = Proxy::HaproxySource.config(Path::new("/tmp/x"), 8080, &[9001, 9002]);
        assert!(text.contains("mode tcp") && text.contains("balance source"));
        assert!(text.contains("server w0 127.0.0.1:9001") && text.contains("server w1 127.0.0.1:9002"));
        assert!(text.contains("bind 127.0.0.1:8080"));
    }
}
