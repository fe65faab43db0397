//! A TLS front for tests: it terminates TLS with a certificate from a private CA made at start
//! and forwards each connection, decrypted, byte for byte to a plain backend — like nginx in
//! front of a self-hosted Mattermost whose certificate comes from an internal CA.
//!
//! ```no_run
//! # async fn demo(sim: &switchboard_tests::sim::Simulator) -> anyhow::Result<()> {
//! use switchboard_tests::tls::{backend_addr, TlsFront};
//! let front = TlsFront::start(backend_addr(&sim.base_url())?).await?;
//! front.write_ca(std::path::Path::new("ca.pem"))?;
//! let base_url = front.base_url(); // https://localhost:<port>
//! # Ok(()) }
//! ```

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

/// A listening TLS front; it stops (and drops its connections) when dropped.
pub struct TlsFront {
    addr: SocketAddr,
    ca_pem: String,
    handshakes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// The `host:port` of a plain `http://HOST:PORT` base URL (the simulator's).
pub fn backend_addr(base_url: &str) -> Result<SocketAddr> {
    let rest = base_url.strip_prefix("http://").with_context(|| format!("not an http:// URL: {base_url}"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.parse().with_context(|| format!("no IP address and port in {base_url}"))
}

impl TlsFront {
    /// Make a CA and a leaf certificate for `localhost` and `127.0.0.1`, listen on
    /// `127.0.0.1:0` and forward every connection to `backend`.
    pub async fn start(backend: SocketAddr) -> Result<TlsFront> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "switchboard test internal CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate()?;
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
        let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;

        let chain = vec![CertificateDer::from(leaf_cert.der().to_vec()), CertificateDer::from(ca_cert.der().to_vec())];
        let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())
            .context("the generated key reads back")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handshakes = Arc::new(AtomicU64::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else { break };
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                connections.spawn(async move {
                    // A client that refuses the certificate ends here (its alert is the error).
                    let Ok(mut client) = acceptor.accept(client).await else { return };
                    counted.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut server) = tokio::net::TcpStream::connect(backend).await else { return };
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                // Forget finished connections as we go.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(TlsFront { addr, ca_pem, handshakes, task })
    }

    /// `https://localhost:<port>`.
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The private CA's certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Write the CA certificate (PEM) to `path`, for a `ca_file`.
    pub fn write_ca(&self, path: &Path) -> Result<()> {
        std::fs::write(path, &self.ca_pem).with_context(|| format!("cannot write {}", path.display()))
    }

    /// TLS handshakes completed so far (clients that trusted the certificate).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every forwarded connection.
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_decrypted_bytes_and_only_clients_that_trust_the_ca_get_through() -> Result<()> {
        let backend = TcpListener::bind("127.0.0.1:0").await?;
        let backend_addr = backend.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    let _ = socket.write_all(&[b"plain:", &buf[..n]].concat()).await;
                });
            }
        });
        let front = TlsFront::start(backend_addr).await?;
        assert!(front.base_url().starts_with("https://localhost:"));

        let trusting = {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(front.ca_pem().as_bytes()) {
                roots.add(cert?)?;
            }
            client(roots)
        };
        let tcp = tokio::net::TcpStream::connect(front.addr()).await?;
        let mut tls = trusting.connect("localhost".try_into()?, tcp).await?;
        tls.write_all(b"hello").await?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await?;
        assert_eq!(answer, b"plain:hello");
        assert_eq!(front.handshakes(), 1);

        let stranger = client(rustls::RootCertStore::empty());
        let tcp = tokio::net::TcpStream::connect(front.addr()).await?;
        let refused = stranger.connect("localhost".try_into()?, tcp).await.map(|_| ()).unwrap_err();
        assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
        Ok(())
    }

    fn client(roots: rustls::RootCertStore) -> tokio_rustls::TlsConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    #[test]
    fn the_backend_address_comes_from_a_plain_base_url() {
        assert_eq!(backend_addr("http://127.0.0.1:8065").unwrap(), "127.0.0.1:8065".parse().unwrap());
        assert_eq!(backend_addr("http://127.0.0.1:8065/").unwrap(), "127.0.0.1:8065".parse().unwrap());
        assert!(backend_addr("https://127.0.0.1:8065").is_err());
    }
}
