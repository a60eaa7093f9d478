//! TLS to NATS: the CA (`--cluster-ca`) and the client certificate and key
//! (`--cluster-cert`, `--cluster-cert-key`), read and checked once, at
//! start, so that a wrong path, a file that is not PEM, or a key that does
//! not belong to its certificate is a one-line error naming the flag
//! (exit 2), never a log line from the bridge minutes later. The bridge
//! builds its TLS client from what is read here
//! ([`crate::cluster::tls`]); nothing is read from disk after start.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::rustls;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// The largest PEM file read: a CA bundle of a few hundred certificates is
/// ~250 KiB; anything past 1 MiB is not a certificate file (or is a
/// mistake such as a log file), and is refused rather than read whole.
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// TLS to NATS, as read at start.
#[derive(Clone)]
pub struct ClusterTls {
    /// The CAs that may sign the servers' certificates: `--cluster-ca`'s,
    /// or the system's.
    pub roots: Arc<[CertificateDer<'static>]>,
    /// Where `roots` came from, in words (`--cluster-ca`, `the system's
    /// CAs`), for the log line when a server's certificate is refused.
    pub trusted: &'static str,
    /// This relay's certificate and key (mutual TLS), if given.
    pub client: Option<Arc<CertifiedKey>>,
    /// A digest of the files' bytes: two configurations are equal when
    /// they read the same bytes (the key itself is never compared or
    /// shown).
    digest: [u8; 32],
    /// What was read, in words, for `Debug` (no key material).
    summary: String,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)
    }
}

impl PartialEq for ClusterTls {
    fn eq(&self, other: &ClusterTls) -> bool {
        self.digest == other.digest
    }
}

impl Eq for ClusterTls {}

/// Reads `path` (at most [`MAX_PEM_FILE`] bytes), for `flag`'s errors.
fn read_capped(flag: &str, path: &Path) -> Result<Vec<u8>, Error> {
    let fail = |why: String| Error::Config(format!("{flag} {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(fail(format!(
            "larger than {} KiB: not a PEM certificate or key file",
            MAX_PEM_FILE >> 10
        )));
    }
    Ok(bytes)
}

/// Every certificate in a PEM file: at least one, and nothing that fails
/// to decode.
fn certificates(
    flag: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let fail = |why: String| Error::Config(format!("{flag} {}: {why}", path.display()));
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| fail(format!("not a valid PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(fail(
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

impl ClusterTls {
    /// Reads the TLS files the settings name, if any; `wants_tls` says
    /// whether a `tls://` URL asks for TLS with the system's CAs.
    pub fn read(
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        wants_tls: bool,
    ) -> Result<Option<ClusterTls>, Error> {
        if ca.is_none() && cert.is_none() && key.is_none() && !wants_tls {
            return Ok(None);
        }
        let mut digest = Sha256::new();
        let mut summary = String::from("ClusterTls { ca: ");
        let (roots, trusted) = match ca {
            Some(path) => {
                let bytes = read_capped("--cluster-ca", path)?;
                digest.update(&bytes);
                let certs = certificates("--cluster-ca", path, &bytes)?;
                // Each must be usable as a trust anchor: say which file is
                // wrong now, not at the first handshake.
                let mut roots = rustls::RootCertStore::empty();
                for c in &certs {
                    roots.add(c.clone()).map_err(|e| {
                        Error::Config(format!(
                            "--cluster-ca {}: a certificate in it is not usable as a CA ({e})",
                            path.display()
                        ))
                    })?;
                }
                summary.push_str(&format!(
                    "{} ({} certificates)",
                    path.display(),
                    certs.len()
                ));
                (Arc::from(certs), "--cluster-ca")
            }
            None => {
                // Read now, like a file: none is a start-up error, not a
                // refused handshake later.
                let system: Vec<_> = rustls_native_certs::load_native_certs()
                    .map_err(|e| Error::Config(format!("--cluster with tls:// and no --cluster-ca: cannot read the system's CA certificates ({e}); give --cluster-ca FILE")))?
                    .into_iter()
                    .filter(|c| rustls::RootCertStore::empty().add(c.clone()).is_ok())
                    .collect();
                if system.is_empty() {
                    return Err(Error::Config("--cluster with tls:// and no --cluster-ca: the system has no CA certificates (install ca-certificates, or give --cluster-ca FILE)".into()));
                }
                summary.push_str(&format!("system ({} certificates)", system.len()));
                (Arc::from(system), "the system's CAs")
            }
        };
        let client = match (cert, key) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::Config(
                    "--cluster-cert-key needs --cluster-cert: the certificate this relay shows NATS, which the key belongs to".into(),
                ))
            }
            (Some(cert_path), key_path) => {
                let cert_bytes = read_capped("--cluster-cert", cert_path)?;
                digest.update(&cert_bytes);
                let chain = certificates("--cluster-cert", cert_path, &cert_bytes)?;
                // The key in its own file, or after the certificates in the
                // same one (a combined PEM).
                let (flag, key_path, bytes) = match key_path {
                    Some(k) => ("--cluster-cert-key", k, read_capped("--cluster-cert-key", k)?),
                    None => ("--cluster-cert", cert_path, cert_bytes),
                };
                digest.update(&bytes);
                let key_fail =
                    |why: String| Error::Config(format!("{flag} {}: {why}", key_path.display()));
                // The error never quotes the file: it holds a private key.
                let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
                    pem::Error::NoItemsFound if flag == "--cluster-cert" => key_fail(
                        "no private key in it: give the certificate's key with --cluster-cert-key".into(),
                    ),
                    pem::Error::NoItemsFound => key_fail(
                        "no private key in it (expected PEM: -----BEGIN PRIVATE KEY-----, RSA or EC)".into(),
                    ),
                    _ => key_fail("not a valid PEM private key".into()),
                })?;
                let provider = rustls::crypto::ring::default_provider();
                let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                    key_fail(format!(
                        "the key cannot be used with --cluster-cert {} ({e})",
                        cert_path.display()
                    ))
                })?;
                summary.push_str(&format!(
                    ", client: {} (key in {})",
                    cert_path.display(),
                    key_path.display()
                ));
                Some(Arc::new(certified))
            }
        };
        summary.push_str(" }");
        Ok(Some(ClusterTls {
            roots,
            trusted,
            client,
            digest: digest.finalize().into(),
            summary,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tag: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("udphub-tls-{}-{tag}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn bad_files_are_one_line_errors_naming_the_flag() {
        let missing = PathBuf::from("/nonexistent/ca.pem");
        let e = ClusterTls::read(Some(&missing), None, None, false).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--cluster-ca /nonexistent/ca.pem: "),
            "{e}"
        );
        let text = file("notpem", b"hello, not a certificate\n");
        let e = ClusterTls::read(Some(&text), None, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--cluster-ca") && e.contains("no certificate"),
            "{e}"
        );
        let big = file("big", &vec![b'A'; (MAX_PEM_FILE + 10) as usize]);
        let e = ClusterTls::read(Some(&big), None, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than 1024 KiB"), "{e}");
        let broken = file(
            "broken",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let e = ClusterTls::read(Some(&broken), None, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cluster-ca") && !e.contains('\n'), "{e}");
        let e = ClusterTls::read(None, Some(&text), None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--cluster-cert") && e.contains("no certificate"),
            "{e}"
        );
        let e = ClusterTls::read(None, None, Some(&text), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs --cluster-cert"), "{e}");
        let secret = file(
            "key",
            b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
        );
        let e = ClusterTls::read(None, Some(&secret), Some(&secret), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--cluster-cert") && !e.contains("c2VjcmV0"),
            "{e}"
        );
        for p in [text, big, broken, secret] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn no_flags_and_no_tls_url_is_no_tls() {
        assert!(ClusterTls::read(None, None, None, false).unwrap().is_none());
        // tls:// alone: the system's CAs (an error naming --cluster-ca on
        // a system without any).
        match ClusterTls::read(None, None, None, true) {
            Ok(Some(system)) => {
                assert!(system.trusted == "the system's CAs" && system.client.is_none());
            }
            Ok(None) => panic!("tls:// is TLS"),
            Err(e) => assert!(e.to_string().contains("--cluster-ca"), "{e}"),
        }
    }
}
