//! TLS for the client: a rustls config that pins the node's certificate by
//! its SHA-256 fingerprint (PROTOCOL.md section 2). TLS 1.3 only, ring
//! provider only, no 0-RTT (early data would let a replayed packet move
//! money).
//!
//! There is deliberately no "accept any certificate" mode: a client either
//! pins the fingerprint or refuses to connect. The node's replicas pin each
//! other with the same verifier ([`PinnedCertificate`]).

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tapledger_certs::Fingerprint;
use tapledger_protocol::ALPN;

/// The one crypto provider tapledger uses (ring): a second one in the
/// process makes rustls refuse to pick a default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client crypto config that accepts exactly the certificate whose SHA-256
/// is `pinned`.
pub fn client_crypto(
    pinned: Fingerprint,
) -> Result<quinn::crypto::rustls::QuicClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = PinnedCertificate::new(pinned, &provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|error| rustls::Error::General(error.to_string()))
}

/// Accepts the one certificate with the pinned fingerprint, and checks that
/// the handshake was signed by its key.
#[derive(Debug)]
pub struct PinnedCertificate {
    pinned: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedCertificate {
    /// Pins `pinned`, verifying handshake signatures with `provider`'s
    /// algorithms.
    pub fn new(pinned: Fingerprint, provider: &CryptoProvider) -> PinnedCertificate {
        PinnedCertificate {
            pinned,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Comparing public fingerprints needs no constant time.
        if self.pinned.matches(end_entity) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
