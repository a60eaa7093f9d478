//! A throwaway PKI for the TLS tests, made with Debian's `openssl` CLI in
//! a temp dir: a CA, a server certificate for 127.0.0.1 (an IP SAN, which
//! is what a client checks for an IP URL), a client certificate, and a
//! second CA that signed nothing of this.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The files, in their own temp dir (removed on drop).
pub struct Pki {
    /// The directory.
    pub dir: PathBuf,
}

impl Pki {
    /// Makes the CA, the server and client certificates, and another CA.
    pub fn new() -> Pki {
        assert!(
            super::require_tool("openssl"),
            "openssl is needed (tests/run.sh installs it)"
        );
        let dir = super::temp_path("pki");
        std::fs::create_dir_all(&dir).expect("pki dir");
        let pki = Pki { dir };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-subj",
                &format!("/CN=udphub test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        }
        pki.leaf(
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        );
        pki.leaf(
            "client",
            "udphub-relay",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        );
        pki
    }

    /// `NAME.pem` (or `.key`) here.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The path as a `&str` argument.
    pub fn arg(&self, file: &str) -> String {
        self.path(file).to_string_lossy().into_owned()
    }

    /// A certificate `name.pem` and key `name.key` for `cn`, signed by the
    /// CA, with the extensions `ext`.
    fn leaf(&self, name: &str, cn: &str, ext: &str) {
        std::fs::write(self.path(&format!("{name}.ext")), ext).expect("write ext");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The environment `deploy/nats/tls.conf` reads: this PKI's server
    /// certificate, key and CA.
    pub fn server_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NATS_TLS_CERT", self.arg("server.pem")),
            ("NATS_TLS_KEY", self.arg("server.key")),
            ("NATS_TLS_CA", self.arg("ca.pem")),
        ]
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file of this repository (`deploy/nats/tls.conf`).
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}
