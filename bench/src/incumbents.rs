//! The servers Roost is compared with, configured here and run from Debian's packages
//! (`deploy/install-deps.sh --bench`): nginx, PHP-FPM. Each writes its config, logs and
//! sockets under the benchmark's temp root, listens on a free loopback port, and never
//! touches the system's own service configs. Each benchmark uses the part it compares with.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use roost_tests::process::Proc;

/// nginx in the foreground with `http_body` inside its `http {}` block: workers per CPU (as
/// Debian's default config), an access log line per request (as Roost logs one per request).
pub fn nginx(root: &Path, http_body: &str) -> Proc {
    let r = root.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes auto;\npid {r}/nginx.pid;\n\
         error_log {r}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log {r}/nginx-access.log;\n  keepalive_requests 1000000;\n\
           client_body_temp_path {r}/nginx-body;\n  proxy_temp_path {r}/nginx-proxy;\n\
           fastcgi_temp_path {r}/nginx-fastcgi;\n  uwsgi_temp_path {r}/nginx-uwsgi;\n\
           scgi_temp_path {r}/nginx-scgi;\n{http_body}}}\n"
    );
    let path = root.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new("/usr/sbin/nginx");
    cmd.arg("-c").arg(&path).arg("-p").arg(root);
    Proc::spawn("nginx", cmd, &root.join("nginx.log"), Signal::SIGTERM)
}

/// Debian's php-fpm binary (`php-fpm8.2` on bookworm), if installed.
pub fn php_fpm_binary() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/sbin")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("php-fpm"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// PHP-FPM with one `pm = ondemand` pool per host in `hosts`, each running as `user` with
/// no child until its first request (what shared hosts run today): pool `i` listens on
/// `socket_dir/<host>.sock`.
pub fn php_fpm(root: &Path, user: &str, hosts: &[String], socket_dir: &Path) -> Proc {
    let r = root.display();
    let mut conf = format!(
        "[global]\npid = {r}/php-fpm.pid\nerror_log = {r}/php-fpm-error.log\ndaemonize = no\n"
    );
    for host in hosts {
        conf += &format!(
            "[{host}]\nuser = {user}\ngroup = {user}\nlisten = {sock}\nlisten.mode = 0666\n\
             pm = ondemand\npm.max_children = 5\npm.process_idle_timeout = 60s\n",
            sock = socket_dir.join(format!("{host}.sock")).display()
        );
    }
    let path = root.join("php-fpm.conf");
    std::fs::write(&path, conf).unwrap();
    let bin = php_fpm_binary().expect("php-fpm is installed (deploy/install-deps.sh --bench)");
    let mut cmd = Command::new(bin);
    cmd.arg("--nodaemonize").arg("--fpm-config").arg(&path);
    Proc::spawn("php-fpm", cmd, &root.join("php-fpm.log"), Signal::SIGTERM)
}

/// An nginx `server {}` per host that hands every request to that host's PHP-FPM pool,
/// running `script`.
pub fn nginx_php_servers(
    listen: SocketAddr,
    hosts: &[String],
    socket_dir: &Path,
    script: &Path,
) -> String {
    hosts
        .iter()
        .map(|host| {
            format!(
                "  server {{\n    listen {listen};\n    server_name {host};\n    location / {{\n\
                       fastcgi_param SCRIPT_FILENAME {script};\n      fastcgi_param REQUEST_METHOD $request_method;\n\
                       fastcgi_param QUERY_STRING $query_string;\n      fastcgi_param SERVER_NAME $host;\n\
                       fastcgi_pass unix:{sock};\n    }}\n  }}\n",
                script = script.display(),
                sock = socket_dir.join(format!("{host}.sock")).display()
            )
        })
        .collect()
}
