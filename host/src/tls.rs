//! TLS trust for the host's outgoing connections (adapter HTTP and WebSockets, agents).
//!
//! Every client trusts the public roots built into the binary (webpki-roots, so a machine
//! without a CA bundle still reaches public servers) and the system's roots (read once per
//! process); a channel instance with `ca_file` trusts that file's certificates as well. The
//! same `rustls` config serves reqwest (`https://`) and tokio-tungstenite (`wss://`), so both
//! trust exactly the same roots. Hostname verification is always on.

use std::{
    error::Error as StdError,
    path::Path,
    sync::{Arc, OnceLock},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer},
    ClientConfig, RootCertStore,
};

/// The CA certificates of a `ca_file`, as read when the config was loaded.
#[derive(Clone, PartialEq)]
pub struct CaFile {
    pub path: std::path::PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFile").field("path", &self.path).field("certificates", &self.certs.len()).finish()
    }
}

/// Read a PEM file of one or more CA certificates, each checked the way rustls will use it.
/// The error is a sentence for the operator (it names the file, never its content).
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        match cert {
            Ok(cert) => certs.push(cert),
            Err(e) => {
                return Err(format!("{} is not valid PEM (certificate {}): {e}", path.display(), i + 1));
            }
        }
    }
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    for (i, cert) in certs.iter().enumerate() {
        let mut store = RootCertStore::empty();
        if let Err(e) = store.add(cert.clone()) {
            return Err(format!(
                "certificate {} of {} in {} cannot be used as a trust anchor: {e}",
                i + 1,
                certs.len(),
                path.display()
            ));
        }
    }
    Ok(certs)
}

/// The public and system roots, read once per process.
fn base_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let public = roots.len();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!("system CA certificates: {error}; the built-in public roots are still trusted");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(public, system = added, system_ignored = ignored, "TLS roots loaded");
        roots
    })
}

/// A client config trusting the public and system roots plus `extra`.
pub fn client_config(extra: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut roots = base_roots().clone();
    for cert in extra {
        // Checked when the config was read; a refusal here cannot happen, but must not panic.
        if let Err(e) = roots.add(cert.clone()) {
            tracing::error!("a ca_file certificate was refused: {e}");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// An HTTP client that uses `tls` for `https://`.
pub fn http_client(tls: &ClientConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
        .use_preconfigured_tls(tls.clone())
        .build()
}

/// What a channel instance's transport connects with: one HTTP client and one WebSocket TLS
/// config, built from the same roots.
#[derive(Clone)]
pub struct ChannelTls {
    pub http: reqwest::Client,
    pub ws: Arc<ClientConfig>,
}

impl ChannelTls {
    /// For a channel instance: the shared default when it has no `ca_file`, else its own.
    pub fn for_channel(channel: &str, ca_file: Option<&CaFile>, default: &ChannelTls) -> ChannelTls {
        let Some(ca_file) = ca_file else { return default.clone() };
        let ws = client_config(&ca_file.certs);
        match http_client(&ws) {
            Ok(http) => ChannelTls { http, ws },
            Err(e) => {
                tracing::error!(
                    channel,
                    ca_file = %ca_file.path.display(),
                    "cannot build the HTTP client with ca_file; HTTPS requests trust the default roots only: {e}"
                );
                ChannelTls { http: default.http.clone(), ws }
            }
        }
    }
}

/// The TLS error somewhere in `error`'s chain, if the failure was one.
pub fn tls_cause<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps: look inside it by hand.
        if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(tls) = tls_cause(inner) {
                return Some(tls);
            }
        }
        next = error.source();
    }
    None
}

/// `error` and its causes in one line (`a: b: c`), each said once.
pub fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = cause.source();
    }
    if let Some(tls) = tls_cause(error) {
        let said = tls.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_missing_or_empty_or_broken_ca_file_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read_ca_file(&dir.path().join("nope.pem")).unwrap_err();
        assert!(missing.contains("cannot read") && missing.contains("nope.pem"), "{missing}");

        let key_only = write(dir.path(), "key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let empty = read_ca_file(&key_only).unwrap_err();
        assert!(empty.contains("holds no certificate"), "{empty}");
        let empty = read_ca_file(&write(dir.path(), "empty.pem", "")).unwrap_err();
        assert!(empty.contains("holds no certificate"), "{empty}");

        // Valid PEM and base64, but not a certificate.
        let junk =
            write(dir.path(), "junk.pem", "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n");
        let refused = read_ca_file(&junk).unwrap_err();
        assert!(refused.contains("cannot be used as a trust anchor"), "{refused}");

        let unterminated = write(dir.path(), "cut.pem", "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n");
        let cut = read_ca_file(&unterminated).unwrap_err();
        assert!(cut.contains("not valid PEM"), "{cut}");
    }

    #[test]
    fn the_default_config_trusts_the_public_roots() {
        let config = client_config(&[]);
        assert!(base_roots().len() >= webpki_roots::TLS_SERVER_ROOTS.len());
        assert!(config.alpn_protocols.is_empty());
    }

    #[test]
    fn a_tls_error_is_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(matches!(
            tls_cause(&io),
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        ));
        assert!(describe(&io).contains("invalid peer certificate: UnknownIssuer"), "{}", describe(&io));
    }
}
