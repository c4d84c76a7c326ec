//! Bearer-token authentication and scope-based authorisation.
//!
//! Tokens are configured as `NAME:SCOPE:SECRET` (flags, environment, the
//! TOML file) or, better, in a tokens file of `NAME SCOPE sha256:HEX` lines
//! so no secret is stored. Only SHA-256 digests are kept in memory; a
//! presented token is hashed and compared to every digest in constant time
//! (`subtle`), so neither timing nor early exit tells which part matched.
//!
//! Scopes are ordered: `read` (GET), `write` (create, change, trigger,
//! cancel), `admin` (everything, including command actions and debugging
//! endpoints). `/livez`, `/readyz`, `/openapi.json` and `/docs` never need a
//! token; `/metrics` needs one only with `--metrics-require-token`.
//! Without any token configured the API is open (the service refuses to
//! start so on a non-loopback address unless `--insecure-no-auth`).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
pub use super::scope::Scope;

/// Who made a request (for audit logs): a token's name, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name, or `anonymous` when authentication is off.
    pub name: Arc<str>,
    /// Its scope.
    pub scope: Scope,
}

struct Token {
    name: Arc<str>,
    scope: Scope,
    digest: [u8; 32],
}

/// The configured tokens.
#[derive(Default)]
pub struct Tokens {
    tokens: Vec<Token>,
    /// Whether `/metrics` needs a (read) token.
    pub metrics_require_token: bool,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print digests, let alone tokens.
        let names: Vec<&str> = self.tokens.iter().map(|t| &*t.name).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Tokens {
    /// Parses `NAME:SCOPE:SECRET` entries and `NAME SCOPE sha256:HEX` file
    /// lines (`#` comments). Errors name the entry, never the secret.
    pub fn parse(entries: &[String], file: Option<&Path>) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(scope), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("token #{} is not NAME:SCOPE:SECRET", i + 1));
            };
            if !valid_name(name) {
                return Err(format!("token #{}: invalid name", i + 1));
            }
            if secret.len() < 16 {
                return Err(format!(
                    "token `{name}`: the secret must have at least 16 characters"
                ));
            }
            tokens.push(Token {
                name: name.into(),
                scope: scope.parse().map_err(|e| format!("token `{name}`: {e}"))?,
                digest: digest(secret),
            });
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let fields: Vec<&str> = line.split_whitespace().collect();
                let hex = match fields.as_slice() {
                    [_, _, hash] => hash.strip_prefix("sha256:"),
                    _ => None,
                };
                let (name, scope) = (fields[0], fields.get(1).copied().unwrap_or(""));
                let bytes = hex.and_then(|h| ::hex::decode(h).ok()).filter(|b| b.len() == 32);
                let (Some(bytes), true) = (bytes, valid_name(name)) else {
                    return Err(format!(
                        "{} line {}: expected `NAME SCOPE sha256:<64 hex digits>`",
                        path.display(),
                        n + 1
                    ));
                };
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&bytes);
                tokens.push(Token {
                    name: name.into(),
                    scope: scope
                        .parse()
                        .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?,
                    digest,
                });
            }
        }
        Ok(Self {
            tokens,
            metrics_require_token: false,
        })
    }

    /// Whether any token is configured (authentication on).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The token presented as `secret`, compared in constant time.
    fn find(&self, secret: &str) -> Option<&Token> {
        let presented = digest(secret);
        let mut found = None;
        for token in &self.tokens {
            // Every digest is compared, whatever matched before.
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(token);
            }
        }
        found
    }
}

/// The SHA-256 hex digest of a secret, as the tokens file wants it.
pub fn hash_secret(secret: &str) -> String {
    ::hex::encode(digest(secret))
}

/// The scope a request needs; `None` for public endpoints.
pub fn required_scope(method: &Method, route: Option<&str>, tokens: &Tokens) -> Option<Scope> {
    match route {
        Some("/livez" | "/readyz" | "/openapi.json") => None,
        Some(r) if r == "/docs" || r.starts_with("/docs/") => None,
        Some("/metrics") => tokens.metrics_require_token.then_some(Scope::Read),
        Some(r) if r.starts_with("/debug/") => Some(Scope::Admin),
        // Previewing a schedule writes nothing.
        Some("/v1/schedules/preview") => Some(Scope::Read),
        _ if method == Method::GET || method == Method::HEAD => Some(Scope::Read),
        _ => Some(Scope::Write),
    }
}

fn challenge(error: Option<&str>) -> HeaderValue {
    let value = match error {
        None => "Bearer realm=\"cronguard\"".to_owned(),
        Some(e) => format!("Bearer realm=\"cronguard\", error=\"{e}\""),
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer"))
}

fn denied(error: ApiError, challenge_error: Option<&str>) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge(challenge_error));
    response
}

/// Authenticates the request and checks its scope; puts the [`Principal`]
/// in the request's extensions for handlers and audit logs.
pub async fn authorize(State(tokens): State<Arc<Tokens>>, mut request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let needed = required_scope(request.method(), route.as_deref(), &tokens);
    let principal = if !tokens.enabled() {
        Principal {
            name: "anonymous".into(),
            scope: Scope::Admin,
        }
    } else {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials);
        match presented.and_then(|secret| tokens.find(secret)) {
            Some(token) => Principal {
                name: token.name.clone(),
                scope: token.scope,
            },
            None if needed.is_none() => Principal {
                name: "anonymous".into(),
                scope: Scope::Read,
            },
            None => {
                let error = if presented.is_some() {
                    Some("invalid_token")
                } else {
                    None
                };
                return denied(ApiError::Unauthorized, error);
            }
        }
    };
    if let Some(needed) = needed
        && principal.scope < needed
    {
        return denied(
            ApiError::Forbidden {
                needed,
                has: principal.scope,
            },
            Some("insufficient_scope"),
        );
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The credentials of an `Authorization: Bearer …` value. The scheme is
/// case-insensitive (RFC 9110 section 11.1); blanks around the token are
/// ignored.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer abc",
            "bearer abc",
            "BEARER abc",
            "BeArEr   abc ",
            " Bearer abc",
        ] {
            assert_eq!(bearer_credentials(value), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc"] {
            assert_eq!(bearer_credentials(value), None, "{value}");
        }
    }

    #[test]
    fn tokens_parse_and_match_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        let secret = "0123456789abcdef-reader";
        std::fs::write(
            &file,
            format!("# comment\nreader read sha256:{}\n", hash_secret(secret)),
        )
        .unwrap();
        let tokens = Tokens::parse(&["ops:admin:0123456789abcdef-admin".into()], Some(&file)).unwrap();
        assert_eq!(
            tokens.find("0123456789abcdef-admin").map(|t| t.scope),
            Some(Scope::Admin)
        );
        assert_eq!(tokens.find(secret).map(|t| &*t.name), Some("reader"));
        assert!(tokens.find("0123456789abcdef-wrong").is_none());
        assert!(!format!("{tokens:?}").contains("0123456789abcdef"));
        assert!(Tokens::parse(&["ops:root:0123456789abcdef".into()], None).is_err());
        assert!(Tokens::parse(&["ops:admin:short".into()], None).is_err());
        let e = Tokens::parse(&["a:b".into()], None).unwrap_err();
        assert!(!e.contains("a:b"));
    }

    #[test]
    fn scopes_by_route() {
        let t = Tokens::default();
        assert_eq!(required_scope(&Method::GET, Some("/livez"), &t), None);
        assert_eq!(required_scope(&Method::GET, Some("/metrics"), &t), None);
        assert_eq!(
            required_scope(&Method::GET, Some("/v1/jobs"), &t),
            Some(Scope::Read)
        );
        assert_eq!(
            required_scope(&Method::POST, Some("/v1/jobs"), &t),
            Some(Scope::Write)
        );
        assert_eq!(
            required_scope(&Method::POST, Some("/v1/schedules/preview"), &t),
            Some(Scope::Read)
        );
        assert_eq!(
            required_scope(&Method::POST, Some("/debug/faults"), &t),
            Some(Scope::Admin)
        );
        assert_eq!(required_scope(&Method::GET, None, &t), Some(Scope::Read));
    }
}
