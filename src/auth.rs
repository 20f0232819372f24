//! Bearer tokens: which ones the API accepts (`auth.tokens`,
//! `auth.tokens_file`), re-read from the file on SIGHUP, and checking one.
//!
//! A presented token is known by its SHA-256 digest, looked up in a set of
//! the known tokens' digests: a check costs the same however many tokens
//! there are (a wrong token is one digest and one lookup), and how long it
//! takes depends on the digest of what was presented, which says nothing
//! about the real tokens (a digest cannot be turned back into a token, nor
//! a near miss of one into a near guess). Tokens never reach a log, a span
//! or a metric label; errors name a token by its position only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::AuthSettings;

/// Shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// A token's SHA-256 digest: what is kept and compared, and the identity a
/// caller is known by (the rate limiter keys on it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(..)")
    }
}

/// Why tokens could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// An inline token is not usable.
    #[error("invalid configuration: auth.tokens: token {position}: {problem}")]
    InlineToken {
        /// 1-based position in the list.
        position: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The tokens file cannot be read.
    #[error("invalid configuration: auth.tokens_file: cannot read {path}: {error}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A line of the tokens file is not a usable token.
    #[error("invalid configuration: auth.tokens_file: {path} line {line}: {problem}")]
    FileToken {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The tokens file holds no token (which would lock every client out).
    #[error("invalid configuration: auth.tokens_file: {path} holds no token")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
}

/// Why a request's credentials were refused (each is a 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header, or not the `Bearer` scheme.
    Missing,
    /// A bearer token that is malformed or not one of ours.
    Invalid,
}

/// Whether `token` can be a bearer token: RFC 6750's `b64token` characters,
/// and between [`MIN_TOKEN_BYTES`] and [`MAX_TOKEN_BYTES`] long.
pub fn check_token(token: &str) -> Result<(), &'static str> {
    if token.len() < MIN_TOKEN_BYTES {
        return Err("is shorter than 16 bytes");
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err("is longer than 4096 bytes");
    }
    let b64token = token.trim_end_matches('=');
    if b64token.is_empty()
        || !b64token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
    {
        return Err(
            "has characters a bearer token cannot have (letters, digits and -._~+/ then = only)",
        );
    }
    Ok(())
}

/// The tokens the API accepts; cloning shares them.
#[derive(Debug, Clone)]
pub struct Tokens(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// Bumped by every reload that changed the set, so that long-lived
    /// requests (SSE streams) can check their token again.
    reloads: tokio::sync::watch::Sender<u64>,
    enabled: bool,
    inline: Vec<TokenDigest>,
    file: Option<PathBuf>,
    /// Inline tokens and the file's, as last loaded.
    current: RwLock<Arc<HashSet<TokenDigest>>>,
}

impl Tokens {
    /// The tokens from settings (reading the file, if one is set). With
    /// none configured every request is let through.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, AuthError> {
        let mut inline = Vec::with_capacity(settings.tokens.len());
        for (index, token) in settings.tokens.iter().enumerate() {
            let token = token.expose_secret();
            check_token(token).map_err(|problem| AuthError::InlineToken {
                position: index + 1,
                problem,
            })?;
            inline.push(TokenDigest::of(token));
        }
        let file = settings.tokens_file.as_ref().map(PathBuf::from);
        let mut current: HashSet<TokenDigest> = inline.iter().copied().collect();
        if let Some(path) = &file {
            current.extend(read_file(path)?);
        }
        Ok(Self(Arc::new(Inner {
            reloads: tokio::sync::watch::Sender::new(0),
            enabled: settings.enabled(),
            inline,
            file,
            current: RwLock::new(Arc::new(current)),
        })))
    }

    /// No token is asked for.
    pub fn disabled() -> Self {
        Self(Arc::new(Inner {
            reloads: tokio::sync::watch::Sender::new(0),
            enabled: false,
            inline: Vec::new(),
            file: None,
            current: RwLock::new(Arc::new(HashSet::new())),
        }))
    }

    /// Whether requests need a token.
    pub fn enabled(&self) -> bool {
        self.0.enabled
    }

    /// Whether there is a file to re-read.
    pub fn has_file(&self) -> bool {
        self.0.file.is_some()
    }

    /// Re-reads the tokens file; the tokens in force change only when the
    /// whole file reads well, so a half-written or broken file keeps the
    /// previous set. Returns how many tokens are now accepted.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let Some(path) = &self.0.file else {
            return Ok(self.0.current.read().len());
        };
        let mut next: HashSet<TokenDigest> = self.0.inline.iter().copied().collect();
        next.extend(read_file(path)?);
        let count = next.len();
        *self.0.current.write() = Arc::new(next);
        self.0.reloads.send_modify(|generation| *generation += 1);
        Ok(count)
    }

    /// Whether `caller`'s token is still accepted (it may have been taken
    /// out of the file since).
    pub fn accepts(&self, caller: &TokenDigest) -> bool {
        self.0.current.read().contains(caller)
    }

    /// Resolves once `caller`'s token is no longer accepted (after a
    /// reload took it out); never while it is.
    pub async fn revoked(&self, caller: TokenDigest) {
        let mut reloads = self.0.reloads.subscribe();
        while self.accepts(&caller) {
            if reloads.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Checks an `Authorization` header value; `Ok` with the caller's
    /// identity when it carries one of our tokens (or auth is off: `None`).
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<Option<TokenDigest>, Refusal> {
        if !self.0.enabled {
            return Ok(None);
        }
        let value = authorization.ok_or(Refusal::Missing)?;
        // `Bearer` is case-insensitive (RFC 9110 auth-scheme), one space.
        let token = match value.split_at_checked(7) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => token,
            _ => return Err(Refusal::Missing),
        };
        let token = std::str::from_utf8(token).map_err(|_| Refusal::Invalid)?;
        let token = token.trim_matches(' ');
        if check_token(token).is_err() {
            return Err(Refusal::Invalid);
        }
        let presented = TokenDigest::of(token);
        if self.accepts(&presented) {
            Ok(Some(presented))
        } else {
            Err(Refusal::Invalid)
        }
    }
}

/// The tokens of a file: one a line, surrounding whitespace ignored, blank
/// lines and `#` comments skipped; at least one.
fn read_file(path: &Path) -> Result<Vec<TokenDigest>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|error| AuthError::Unreadable {
        path: path.to_owned(),
        error,
    })?;
    let mut tokens = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        check_token(line).map_err(|problem| AuthError::FileToken {
            path: path.to_owned(),
            line: index + 1,
            problem,
        })?;
        tokens.push(TokenDigest::of(line));
    }
    if tokens.is_empty() {
        return Err(AuthError::EmptyFile {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const A: &str = "token-aaaaaaaaaaaaaaaa";
    const B: &str = "token-bbbbbbbbbbbbbbbb";

    fn settings(tokens: &[&str], file: Option<&Path>) -> AuthSettings {
        AuthSettings {
            tokens: tokens.iter().map(|t| (*t).into()).collect(),
            tokens_file: file.map(|p| p.display().to_string()),
        }
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn without_tokens_everything_passes() {
        let tokens = Tokens::from_settings(&settings(&[], None)).unwrap();
        assert!(!tokens.enabled());
        assert_eq!(tokens.check(None), Ok(None));
    }

    #[test]
    fn only_a_known_bearer_token_passes() {
        let tokens = Tokens::from_settings(&settings(&[A, B], None)).unwrap();
        assert!(tokens.check(Some(&bearer(A))).unwrap().is_some());
        assert!(tokens.check(Some(&bearer(B))).unwrap().is_some());
        assert_eq!(
            tokens
                .check(Some(format!("bearer {A}").as_bytes()))
                .map(|_| ()),
            Ok(()),
            "the scheme is case-insensitive"
        );
        assert_eq!(tokens.check(None), Err(Refusal::Missing));
        assert_eq!(
            tokens.check(Some(format!("Basic {A}").as_bytes())),
            Err(Refusal::Missing)
        );
        assert_eq!(
            tokens.check(Some(&bearer("token-cccccccccccccccc"))),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            tokens.check(Some(&bearer(&A[..A.len() - 1]))),
            Err(Refusal::Invalid),
            "a prefix is not the token"
        );
        assert_eq!(
            tokens.check(Some(b"Bearer \xff\xfe")),
            Err(Refusal::Invalid)
        );
        assert_eq!(tokens.check(Some(b"Bearer")), Err(Refusal::Missing));
    }

    #[test]
    fn unusable_tokens_are_refused_at_start_by_position() {
        let error = Tokens::from_settings(&settings(&[A, "short"], None)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("auth.tokens: token 2"), "{message}");
        assert!(!message.contains("short:"), "{message}");
        let error = Tokens::from_settings(&settings(&["has space in it, 16+"], None)).unwrap_err();
        assert!(error.to_string().contains("characters"), "{error}");
    }

    #[test]
    fn the_file_is_read_and_reread_and_a_broken_file_keeps_the_old_set() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "# ops tokens\n\n  {A}  \n").unwrap();
        let tokens = Tokens::from_settings(&settings(&[], Some(file.path()))).unwrap();
        assert!(tokens.enabled());
        assert!(tokens.check(Some(&bearer(A))).is_ok());
        assert!(tokens.check(Some(&bearer(B))).is_err());

        let a_caller = tokens.check(Some(&bearer(A))).unwrap().unwrap();
        std::fs::write(file.path(), format!("{B}\n")).unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert!(!tokens.accepts(&a_caller), "A's holder is out");
        assert!(tokens.check(Some(&bearer(B))).is_ok());
        assert!(tokens.check(Some(&bearer(A))).is_err(), "A was revoked");

        std::fs::write(file.path(), "not a token\n").unwrap();
        let error = tokens.reload().unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        assert!(tokens.check(Some(&bearer(B))).is_ok(), "the old set holds");
        std::fs::write(file.path(), "# nothing\n").unwrap();
        assert!(matches!(tokens.reload(), Err(AuthError::EmptyFile { .. })));
        assert!(tokens.check(Some(&bearer(B))).is_ok());
    }

    #[test]
    fn a_missing_file_stops_the_start_naming_the_key() {
        let error = Tokens::from_settings(&settings(&[], Some(Path::new("/nonexistent/tokens"))))
            .unwrap_err();
        assert!(error.to_string().contains("auth.tokens_file"), "{error}");
    }
}
