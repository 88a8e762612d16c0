//! rustls client settings shared by the https, gRPC-over-TLS and inference
//! probes: ring as the crypto provider (no OpenSSL, no aws-lc build), the
//! webpki roots, plus an optional private CA or an explicit skip-verify.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::ProbeError;

/// TLS settings of a probe (used only when the probe has `tls: true`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of extra CA certificates to trust (private PKI).
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate chain (the handshake signature is still
    /// checked). For lab setups only.
    pub insecure_skip_verify: bool,
    /// Name to verify and send as SNI; default: the backend's IP address.
    pub server_name: Option<String>,
}

fn provider() -> Arc<CryptoProvider> {
    // Explicit provider: no dependence on a process-wide default being
    // installed, and no panic if another crate enables a second provider.
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The rustls client configuration for `opts`. The default (webpki roots
/// only) is built once and shared by every probe.
pub(crate) fn client_config(opts: &TlsOptions) -> Result<ClientConfig, ProbeError> {
    static DEFAULT: OnceLock<ClientConfig> = OnceLock::new();
    if opts.ca_file.is_none() && !opts.insecure_skip_verify {
        if let Some(c) = DEFAULT.get() {
            return Ok(c.clone());
        }
        let c = build(opts)?;
        return Ok(DEFAULT.get_or_init(|| c).clone());
    }
    build(opts)
}

fn build(opts: &TlsOptions) -> Result<ClientConfig, ProbeError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    if opts.insecure_skip_verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipChainVerify(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth());
    }
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &opts.ca_file {
        for cert in load_pem(path)? {
            roots.add(cert)?;
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

fn load_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProbeError> {
    let ca_err = |source| ProbeError::CaFile {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(ca_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(ca_err)?;
    if certs.is_empty() {
        return Err(ProbeError::EmptyCaFile(path.to_owned()));
    }
    Ok(certs)
}

/// Skips chain and name validation but still verifies the handshake
/// signatures, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct SkipChainVerify(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for SkipChainVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_has_webpki_roots_and_is_shared() {
        let a = client_config(&TlsOptions::default()).unwrap();
        let b = client_config(&TlsOptions::default()).unwrap();
        assert!(Arc::ptr_eq(
            &a.crypto_provider().clone(),
            &b.crypto_provider().clone()
        ));
    }

    #[test]
    fn missing_ca_file_names_the_path() {
        let opts = TlsOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        };
        let err = client_config(&opts).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn ca_file_without_certificates_is_refused() {
        let path =
            std::env::temp_dir().join(format!("failover-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let opts = TlsOptions {
            ca_file: Some(path.clone()),
            ..TlsOptions::default()
        };
        let err = client_config(&opts).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, ProbeError::EmptyCaFile(_)), "{err}");
    }

    /// A TLS handshake over an in-memory pipe with a server showing a
    /// self-signed certificate for `backend.invalid`; the client's error
    /// as text, if any.
    async fn handshake(opts: &TlsOptions) -> Result<(), String> {
        use rustls::pki_types::PrivateKeyDer;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cert = rcgen::generate_simple_self_signed(vec!["backend.invalid".to_owned()]).unwrap();
        let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let served = tokio::spawn(async move {
            let mut s = acceptor.accept(s).await.ok()?;
            s.write_all(b"ok").await.ok()?;
            s.shutdown().await.ok()
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(opts).unwrap()));
        // Another name than the certificate's, as a lab backend's often is.
        let name = ServerName::try_from("other.invalid").unwrap();
        let result = match connector.connect(name, c).await {
            Ok(mut tls) => {
                let mut got = Vec::new();
                tls.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
                assert_eq!(got, b"ok");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        served.abort();
        result
    }

    #[tokio::test]
    async fn skip_verify_accepts_any_chain_and_default_does_not() {
        let skip = TlsOptions {
            insecure_skip_verify: true,
            ..TlsOptions::default()
        };
        assert_eq!(handshake(&skip).await, Ok(()));
        let err = handshake(&TlsOptions::default()).await.unwrap_err();
        assert!(err.contains("invalid peer certificate"), "{err}");
    }
}
