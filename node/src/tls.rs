//! TLS for QUIC: the node's rustls server config (the client's, which pins
//! the node's certificate by its SHA-256 fingerprint, is in
//! `tapledger_client::tls` and re-exported here). TLS 1.3 only, ring
//! provider only, no 0-RTT (early data would let a replayed packet move money).
//!
//! There is deliberately no "accept any certificate" mode: a client either
//! pins the fingerprint or refuses to connect.
//!
//! Replicas talk to each other on their own ALPN ([`PEER_ALPN`]) with mutual
//! TLS: each side presents its certificate and accepts only the certificates
//! of replicas it knows ([`PeerTrust`]), so nothing unauthenticated reaches
//! the Raft layer.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tapledger_certs::Fingerprint;
pub use tapledger_client::tls::client_crypto;
use tapledger_client::tls::{PinnedCertificate, provider};
use tapledger_protocol::ALPN;

/// The ALPN of replication between replicas; phones never speak it.
pub const PEER_ALPN: &[u8] = b"tapledger-raft/1";

/// The certificate fingerprints of the replicas this one accepts as peers.
/// Clones share the set, which follows the cluster's membership.
#[derive(Clone, Debug, Default)]
pub struct PeerTrust(Arc<RwLock<HashSet<Fingerprint>>>);

impl PeerTrust {
    /// Replaces the trusted set.
    pub fn set(&self, fingerprints: impl IntoIterator<Item = Fingerprint>) {
        *self.0.write().expect("trust lock") = fingerprints.into_iter().collect();
    }

    pub fn trusts(&self, certificate: &CertificateDer<'_>) -> bool {
        self.0
            .read()
            .expect("trust lock")
            .contains(&Fingerprint::of(certificate))
    }

    pub fn len(&self) -> usize {
        self.0.read().expect("trust lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The server side of replication: presents this replica's certificate and
/// requires a trusted peer certificate from the client.
pub fn peer_server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust: PeerTrust,
) -> Result<quinn::crypto::rustls::QuicServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = TrustedPeers {
        trust,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    config.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|error| rustls::Error::General(error.to_string()))
}

/// The client side of replication: pins the target replica's certificate
/// and presents this replica's own.
pub fn peer_client_crypto(
    pinned: Fingerprint,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = PinnedCertificate::new(pinned, &provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    config.enable_early_data = false;
    quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|error| rustls::Error::General(error.to_string()))
}

/// Accepts a client certificate only if its fingerprint is trusted, and
/// checks that the handshake was signed by its key.
#[derive(Debug)]
struct TrustedPeers {
    trust: PeerTrust,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for TrustedPeers {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.trust.trusts(end_entity) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(
                fingerprint = %Fingerprint::of(end_entity),
                "replication connection from an unknown certificate refused"
            );
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

/// The node's QUIC server crypto config.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No early data: requests that move money must never be replayable.
    config.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|error| rustls::Error::General(error.to_string()))
}
