//! Secrets in job definitions: references to the service's environment,
//! and redaction of secret HTTP headers.
//!
//! A job should not hold a secret. Instead an HTTP header value or a
//! command environment value may reference `${CRONGUARD_SECRET_<NAME>}`,
//! which is read from the service's own environment when the action runs.
//! Only variables with that prefix can be referenced: a job author must not
//! be able to read the service's other variables (its tokens, say) by
//! pointing a header at a server they control. Header values that are
//! secrets anyway (`Authorization`, ... or those listed in
//! `secret_headers`) are never shown back by the API.

/// The prefix of environment variables jobs may reference.
pub const SECRET_PREFIX: &str = "CRONGUARD_SECRET_";

/// What the API shows instead of a secret header value. Sending it back
/// unchanged in a `PUT` keeps the stored value.
pub const REDACTED: &str = "<redacted>";

/// Headers whose values are always treated as secret.
pub const ALWAYS_SECRET: &[&str] = &["authorization", "proxy-authorization", "cookie", "x-api-key"];

/// Whether header `name` holds a secret.
pub fn is_secret_header(name: &str, declared: &[String]) -> bool {
    ALWAYS_SECRET.iter().any(|h| h.eq_ignore_ascii_case(name))
        || declared.iter().any(|d| d.eq_ignore_ascii_case(name))
}

/// The `${...}` references in `value`, checked: each must name a variable
/// with [`SECRET_PREFIX`]. A lone `$` is text.
pub fn references(value: &str) -> Result<Vec<&str>, String> {
    let mut refs = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("an unclosed `${` reference".into());
        };
        let name = &after[..end];
        let valid = name.len() > SECRET_PREFIX.len()
            && name.starts_with(SECRET_PREFIX)
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(format!(
                "`${{{name}}}`: only variables named {SECRET_PREFIX}<NAME> (A-Z, 0-9, _) can be referenced"
            ));
        }
        refs.push(name);
        rest = &after[end + 1..];
    }
    Ok(refs)
}

/// `value` with every reference replaced by the service environment's
/// value; an error names a missing variable.
pub fn expand(value: &str) -> Result<String, String> {
    let refs = references(value)?;
    if refs.is_empty() {
        return Ok(value.to_owned());
    }
    let mut out = value.to_owned();
    for name in refs {
        let resolved = std::env::var(name)
            .map_err(|_| format!("the service environment has no variable {name} (referenced by the job)"))?;
        out = out.replace(&format!("${{{name}}}"), &resolved);
    }
    Ok(out)
}

/// `text` with the password of a URL (`scheme://user:PASSWORD@host`)
/// replaced by `***`, for messages that name a database, proxy or target
/// URL. Text that is not a URL, or has no password, comes back unchanged.
pub fn redact_url_credentials(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut u) if u.password().is_some() => {
            if u.set_password(Some("***")).is_ok() {
                u.to_string()
            } else {
                "<a URL with credentials>".to_owned()
            }
        }
        Ok(_) => text.to_owned(),
        // Not parseable: never echo what might hold a password.
        Err(_) if text.contains('@') => "<a URL with credentials>".to_owned(),
        Err(_) => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prefixed_variables_can_be_referenced() {
        assert_eq!(
            references("Bearer ${CRONGUARD_SECRET_API}").unwrap(),
            ["CRONGUARD_SECRET_API"]
        );
        assert_eq!(references("costs $5").unwrap(), Vec::<&str>::new());
        for bad in [
            "${HOME}",
            "${CRONGUARD_TOKENS}",
            "${CRONGUARD_SECRET_}",
            "${cronguard_secret_x}",
            "${X",
        ] {
            assert!(references(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn expansion_reads_the_environment() {
        // Setting variables is `unsafe` in edition 2024; the positive case
        // is covered by the integration tests, which set them on the binary.
        assert!(
            expand("${CRONGUARD_SECRET_SURELY_UNSET_1}")
                .unwrap_err()
                .contains("no variable")
        );
        assert_eq!(expand("plain").unwrap(), "plain");
        assert!(is_secret_header("Authorization", &[]));
        assert!(is_secret_header("X-Token", &["x-token".into()]));
        assert!(!is_secret_header("Content-Type", &[]));
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            redact_url_credentials("postgres://postgres:s3cret@127.0.0.1:5432/db"),
            "postgres://postgres:***@127.0.0.1:5432/db"
        );
        assert_eq!(
            redact_url_credentials("sqlite://cronguard.db"),
            "sqlite://cronguard.db"
        );
        assert_eq!(redact_url_credentials("cronguard.db"), "cronguard.db");
        assert!(!redact_url_credentials("weird://u:s3cret@[::1").contains("s3cret"));
    }
}
