//! etcd as production runs it (issue 10): TLS on the client port, `--client-cert-auth`, and
//! `auth enable` with the least-privilege roles of `deploy/etcd/roles.sh` (the script itself
//! runs here, so the deploy instructions are what the tests check).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bins::workspace_root;

/// The etcd user each Roost component runs as (see `deploy/etcd/roles.sh`).
pub const PROXY_USER: &str = "roost-proxy";
pub const OPERATOR_USER: &str = "roost-operator";
/// The user of the agent of node `node`.
pub fn agent_user(node: &str) -> String {
    format!("roost-agent-{node}")
}

/// A certificate authority made with the `openssl` command, in a directory.
pub struct Pki {
    dir: PathBuf,
    name: String,
}

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA called `name` (its files are `<dir>/<name>-ca.*`).
    pub fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let pki = Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path_str(&pki.ca_key()),
            "-out",
            path_str(&pki.ca_cert()),
        ]);
        pki
    }

    /// The CA certificate (PEM), for `--etcd-ca` and the like.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.crt", self.name))
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.key", self.name))
    }

    /// A certificate for `cn` signed by this CA, valid for clients and servers, with the
    /// loopback address and `localhost` as names.
    pub fn issue(&self, cn: &str) -> CertFiles {
        self.issue_with_names(cn, "IP:127.0.0.1,DNS:localhost")
    }

    /// A certificate for `cn` with `names` as its subjectAltName (`DNS:x,IP:y`).
    pub fn issue_with_names(&self, cn: &str, names: &str) -> CertFiles {
        let stem = self.dir.join(format!("{}-{cn}", self.name));
        let files = CertFiles {
            cert: stem.with_extension("crt"),
            key: stem.with_extension("key"),
        };
        let csr = stem.with_extension("csr");
        let ext = stem.with_extension("ext");
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={names}\n\
                 extendedKeyUsage=serverAuth,clientAuth\n\
                 basicConstraints=CA:FALSE\n"
            ),
        )
        .expect("write extensions file");
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            path_str(&files.key),
            "-out",
            path_str(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr),
            "-CA",
            path_str(&self.ca_cert()),
            "-CAkey",
            path_str(&self.ca_key()),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            path_str(&ext),
            "-out",
            path_str(&files.cert),
        ]);
        files
    }
}

/// What a secured etcd's clients need: its CA, and per user a certificate and a password.
pub struct EtcdTls {
    pub pki: Pki,
    pub server: CertFiles,
    /// Certificate of etcd's `root` user (CN=root), used by the harness's etcdctl.
    pub root: CertFiles,
    pub password_dir: PathBuf,
    dir: PathBuf,
}

impl EtcdTls {
    /// A CA, etcd's server certificate and root's client certificate, under `dir`.
    pub fn new(dir: &Path) -> EtcdTls {
        let pki = Pki::new(&dir.join("pki"), "cluster");
        let server = pki.issue("etcd");
        let root = pki.issue("root");
        EtcdTls {
            pki,
            server,
            root,
            password_dir: dir.join("etcd-passwords"),
            dir: dir.to_path_buf(),
        }
    }

    /// etcd's flags for TLS with client certificates on the client port.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--cert-file".into(),
            path_str(&self.server.cert).into(),
            "--key-file".into(),
            path_str(&self.server.key).into(),
            "--trusted-ca-file".into(),
            path_str(&self.pki.ca_cert()).into(),
            "--client-cert-auth".into(),
        ]
    }

    /// etcdctl's flags to act as root.
    pub fn etcdctl_args(&self) -> Vec<String> {
        vec![
            format!("--cacert={}", path_str(&self.pki.ca_cert())),
            format!("--cert={}", path_str(&self.root.cert)),
            format!("--key={}", path_str(&self.root.key)),
        ]
    }

    /// The password file `deploy/etcd/roles.sh` wrote for `user`.
    pub fn password_file(&self, user: &str) -> PathBuf {
        self.password_dir.join(format!("{user}.password"))
    }

    /// The `--etcd-*` flags a Roost binary needs to act as etcd user `user`: the cluster
    /// CA, a certificate issued to `user` (made on first use), and the user's password.
    pub fn client_args(&self, user: &str) -> Vec<String> {
        let cert = self.client_cert(user);
        vec![
            "--etcd-ca".into(),
            path_str(&self.pki.ca_cert()).into(),
            "--etcd-cert".into(),
            path_str(&cert.cert).into(),
            "--etcd-key".into(),
            path_str(&cert.key).into(),
            "--etcd-user".into(),
            user.into(),
            "--etcd-password-file".into(),
            path_str(&self.password_file(user)).into(),
        ]
    }

    /// The client certificate of `user` (CN = user), issued on first use.
    pub fn client_cert(&self, user: &str) -> CertFiles {
        let existing = CertFiles {
            cert: self.dir.join("pki").join(format!("cluster-{user}.crt")),
            key: self.dir.join("pki").join(format!("cluster-{user}.key")),
        };
        if existing.cert.is_file() && existing.key.is_file() {
            existing
        } else {
            self.pki.issue(user)
        }
    }

    /// Run `deploy/etcd/roles.sh` against the etcd at `url` for nodes `nodes`: users,
    /// roles, then `auth enable`.
    pub fn apply_roles(&self, url: &str, nodes: &[&str]) {
        let script = workspace_root().join("deploy/etcd/roles.sh");
        let out = Command::new("sh")
            .arg(&script)
            .arg(&self.password_dir)
            .args(nodes)
            .env("ETCDCTL_ENDPOINTS", url)
            .env("ETCDCTL_CACERT", self.pki.ca_cert())
            .env("ETCDCTL_CERT", &self.root.cert)
            .env("ETCDCTL_KEY", &self.root.key)
            .output()
            .expect("run deploy/etcd/roles.sh");
        assert!(
            out.status.success(),
            "deploy/etcd/roles.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (deploy/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stderr)
    );
}
