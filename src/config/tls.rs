//! `tls:`: the TLS listener's address and its certificate and key files.
//! The files are read and checked here the way the listener uses them
//! ([`load_pair`]: PEM parsed, the key loaded by rustls, the key matched
//! to the leaf certificate), so `sluice check` refuses what the listener
//! would, at the token of the field at fault. Called by `validate` and by
//! the listener's certificate handle (the top-level `tls` module), at
//! start and reload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora_core::tls::sign::CertifiedKey;
use pingora_core::tls::{CryptoProvider, RusTlsError};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_saphyr::{Location, Spanned};

use super::error::Problems;
use super::model::TlsConfig;
use super::raw::RawGateway;
use super::validate::config_dir;

/// Which file of `tls:` a problem is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    /// `tls.cert`
    Cert,
    /// `tls.key`
    Key,
}

impl TlsFile {
    /// The config key.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsFile::Cert => "cert",
            TlsFile::Key => "key",
        }
    }
}

/// A certificate or key that cannot serve: unreadable, not PEM, not a key
/// rustls takes, or a key that is not the certificate's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("tls.{}: {message}", file.as_str())]
pub struct TlsFileError {
    /// The file at fault.
    pub file: TlsFile,
    /// What is wrong, naming the path.
    pub message: String,
}

fn fault(file: TlsFile, message: String) -> TlsFileError {
    TlsFileError { file, message }
}

/// A PEM parse error in words (pki-types prints byte arrays).
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no -----END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a malformed -----BEGIN line".into(),
        pem::Error::Base64Decode(e) => format!("bad base64 in a PEM section ({e})"),
        other => other.to_string(),
    }
}

/// The crypto provider pingora's rustls listener uses (ring), installed
/// as the process default if nothing is yet.
fn provider() -> Option<&'static Arc<CryptoProvider>> {
    pingora_core::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
}

/// Reads a PEM certificate chain (leaf first) and its private key, and
/// checks that rustls can serve them: the key loads and is the leaf's.
/// On error, the first problem (see [`check_pair`] for all of them).
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsFileError> {
    check_pair(cert, key).map_err(|mut all| all.swap_remove(0))
}

/// [`load_pair`] with every problem: an unreadable certificate does not
/// hide an unreadable key. Never an empty list.
pub fn check_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, Vec<TlsFileError>> {
    let (chain, private) = match (read_chain(cert), read_key(key)) {
        (Ok(chain), Ok(private)) => (chain, private),
        (chain, private) => {
            return Err([chain.err(), private.err()].into_iter().flatten().collect());
        }
    };
    let Some(provider) = provider() else {
        return Err(vec![fault(
            TlsFile::Key,
            "no TLS crypto provider is installed".into(),
        )]);
    };
    CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        vec![match e {
            RusTlsError::InconsistentKeys(_) => fault(
                TlsFile::Key,
                format!(
                    "{} is not the private key of the certificate in {}",
                    key.display(),
                    cert.display()
                ),
            ),
            RusTlsError::General(_) => fault(
                TlsFile::Key,
                format!("{}: not a key rustls can use: {e}", key.display()),
            ),
            e => fault(
                TlsFile::Cert,
                format!("{}: not a certificate rustls can use: {e}", cert.display()),
            ),
        }]
    })
}

fn read_chain(cert: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = std::fs::read(cert).map_err(|e| {
        fault(
            TlsFile::Cert,
            format!("cannot read {}: {e}", cert.display()),
        )
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            fault(
                TlsFile::Cert,
                format!("{}: {}", cert.display(), pem_problem(&e)),
            )
        })?;
    if chain.is_empty() {
        return Err(fault(
            TlsFile::Cert,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                cert.display()
            ),
        ));
    }
    Ok(chain)
}

fn read_key(key: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let pem = std::fs::read(key)
        .map_err(|e| fault(TlsFile::Key, format!("cannot read {}: {e}", key.display())))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => fault(
            TlsFile::Key,
            format!(
                "{} holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)",
                key.display()
            ),
        ),
        e => fault(
            TlsFile::Key,
            format!("{}: {}", key.display(), pem_problem(&e)),
        ),
    })
}

/// A path from the config, resolved from gateway.yaml's folder.
fn resolve(config: &Path, path: &str) -> PathBuf {
    if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        config_dir(config).join(path)
    }
}

/// Validates `tls:`: all three keys, an address of its own, and files
/// the listener can serve. `listens` are the other listeners' addresses
/// with their config keys.
pub(super) fn tls(
    p: &mut Problems,
    raw: &RawGateway,
    listens: &[(&str, Option<SocketAddr>)],
) -> Option<TlsConfig> {
    let t = raw.tls.as_ref()?;
    let at = t.referenced;
    let before = p.count();
    let listen = p.required(at, "tls.listen", &t.value.listen).and_then(|l| {
        let addr = p.check(
            l.referenced,
            l.value.parse::<SocketAddr>().map_err(|_| {
                format!(
                    "tls.listen: {:?} is not an ip:port address like 0.0.0.0:8443 (host names are not resolved)",
                    l.value
                )
            }),
        )?;
        if let Some((other, _)) = listens.iter().find(|(_, a)| *a == Some(addr)) {
            p.add(
                l.referenced,
                format!("tls.listen: {addr} is also the {other} address"),
            );
        }
        Some(addr)
    });
    let path = |p: &mut Problems, field: &str, v: &Option<Spanned<String>>| {
        let v = p.required(at, field, v)?;
        if v.value.trim().is_empty() {
            p.add(v.referenced, format!("{field}: must name a file"));
            return None;
        }
        Some((resolve(p.file(), &v.value), v.referenced))
    };
    let cert = path(p, "tls.cert", &t.value.cert);
    let key = path(p, "tls.key", &t.value.key);
    if let (Some((cert, cert_at)), Some((key, key_at))) = (&cert, &key) {
        for e in check_pair(cert, key).err().unwrap_or_default() {
            let loc: Location = match e.file {
                TlsFile::Cert => *cert_at,
                TlsFile::Key => *key_at,
            };
            p.add(loc, e.to_string());
        }
    }
    if p.count() > before {
        return None;
    }
    Some(TlsConfig {
        listen: listen?,
        cert: cert?.0,
        key: key?.0,
    })
}
