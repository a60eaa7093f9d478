//! The bridge's TLS client, built from what the configuration read at
//! start ([`ClusterTls`]), and the one thing async-nats does not say: *why*
//! a handshake failed. It reports every failure as a bare "IO error", so
//! the certificate check and the client-certificate choice are wrapped
//! here to leave a note ([`TlsTrouble`]) that the bridge's connection log
//! line quotes: "the server's certificate is not signed by --cluster-ca",
//! "the server asks for a client certificate".

use std::sync::{Arc, Mutex};

use async_nats::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::config::ClusterTls;

/// The last TLS trouble, in words, for the bridge's log line; cleared on
/// a successful connection. One short string: bounded.
#[derive(Debug, Clone, Default)]
pub struct TlsTrouble(Arc<Mutex<Option<String>>>);

impl TlsTrouble {
    fn note(&self, why: String) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(why);
        }
    }

    /// Takes the note left since the last call, if any.
    pub fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// The TLS client for NATS: trusts `tls.ca` (or the system's CAs), shows
/// `tls.client` when asked, and leaves a note in `trouble` when either
/// side of the check fails.
pub fn client_config(
    tls: &ClusterTls,
    trouble: &TlsTrouble,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    // Checked at start: each is a usable trust anchor.
    roots.add_parsable_certificates(tls.roots.iter().cloned());
    let webpki =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| format!("TLS: {e}"))?;
    let verifier = Arc::new(Noting {
        inner: webpki,
        trusted: tls.trusted,
        trouble: trouble.clone(),
    });
    let resolver = Arc::new(ClientCert {
        key: tls.client.clone(),
        trouble: trouble.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver))
}

/// rustls' own certificate check (WebPKI, the server's name or IP), which
/// leaves a note when it refuses.
#[derive(Debug)]
struct Noting {
    inner: Arc<WebPkiServerVerifier>,
    /// Where the trusted CAs came from, for the note.
    trusted: &'static str,
    trouble: TlsTrouble,
}

impl ServerCertVerifier for Noting {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(e) = &verdict {
            let why = match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                    "the server's certificate is not signed by a CA of {}",
                    self.trusted
                ),
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => format!(
                    "the server's certificate is not for {} (the host in the URL must be one of its names or IP addresses)",
                    server_name.to_str()
                ),
                other => format!("the server's certificate was refused: {other}"),
            };
            self.trouble.note(why);
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// This relay's certificate, if it has one; asked for by a server that
/// verifies clients, which leaves a note when there is none to show.
#[derive(Debug)]
struct ClientCert {
    key: Option<Arc<CertifiedKey>>,
    trouble: TlsTrouble,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        match &self.key {
            Some(key) => {
                // If the server refuses it, this is what the log says.
                self.trouble.note(
                    "the server asked for a client certificate and may have refused --cluster-cert (is it signed by a CA the server trusts?)".into(),
                );
                Some(Arc::clone(key))
            }
            None => {
                self.trouble.note(
                    "the server asks for a client certificate: give --cluster-cert and --cluster-cert-key".into(),
                );
                None
            }
        }
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}
