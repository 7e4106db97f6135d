//! Certificates for tapledger nodes: generates a self-signed certificate with
//! rcgen, loads an operator's PEM pair, and computes the fingerprint phones pin.
//!
//! It does no networking; `tapledger-node` and the client hand the results to
//! rustls.
