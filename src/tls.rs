//! The TLS listener's certificate, swappable while the gateway runs.
//!
//! pingora 0.9's rustls listener takes a certificate resolver
//! (`TlsSettings::set_cert_resolver`) that rustls asks at every handshake;
//! [`TlsCerts`] is that resolver, over an `ArcSwap` of the certificate
//! and key read from `tls.cert` and `tls.key`. [`TlsCerts::reload`] reads
//! the files again (a reload, after certbot renewed them): a pair that
//! does not serve (unreadable, not PEM, key not the certificate's) is an
//! error and the old pair keeps serving; a good one serves every
//! handshake from then on, connections already open keep theirs. The
//! listener offers HTTP/2 and HTTP/1.1 by ALPN (`h2`, `http/1.1`).
//!
//! Built by `server` at start; the reloader calls `reload`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::tls::sign::CertifiedKey;
use pingora_core::tls::{ClientHello, ResolvesServerCert};

use crate::config::tls::{load_pair, TlsFileError};
use crate::config::TlsConfig;

/// The certificate and key the TLS listener serves.
pub struct TlsCerts {
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for TlsCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsCerts")
            .field("chain_len", &self.current.load().cert.len())
            .finish()
    }
}

impl TlsCerts {
    /// Reads `tls.cert` and `tls.key`.
    pub fn load(tls: &TlsConfig) -> Result<Self, TlsFileError> {
        Ok(Self {
            current: ArcSwap::from_pointee(load_pair(&tls.cert, &tls.key)?),
        })
    }

    /// Reads the files again and serves them to new handshakes; on error
    /// the pair in force stays.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), TlsFileError> {
        let pair = load_pair(&tls.cert, &tls.key)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }

    /// The DER of the leaf certificate served now.
    pub fn leaf(&self) -> Option<Vec<u8>> {
        self.current.load().cert.first().map(|c| c.to_vec())
    }

    /// pingora listener settings that take their certificate from `certs`
    /// at each handshake, with HTTP/2 preferred over HTTP/1.1 by ALPN.
    pub fn settings(certs: &Arc<Self>) -> Result<TlsSettings, TlsFileError> {
        // The paths are ignored once a resolver is set.
        let mut settings = TlsSettings::intermediate("", "").map_err(|e| TlsFileError {
            file: crate::config::tls::TlsFile::Cert,
            message: format!("cannot set up the TLS listener: {e}"),
        })?;
        settings.set_cert_resolver(certs.clone());
        settings.enable_h2();
        Ok(settings)
    }
}

impl ResolvesServerCert for TlsCerts {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One certificate for every name (no SNI selection): the shop's.
        Some(self.current.load_full())
    }
}
