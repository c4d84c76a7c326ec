//! What a job may not set: request headers that decide how the request is
//! framed or routed, and environment variables that change which code a
//! program loads (they would defeat `--command-allowlist`: an allowed
//! program with `LD_PRELOAD` runs any code).
//!
//! Both are refused when a job is written and checked again before each
//! attempt, so a job stored before a rule existed fails its runs with the
//! reason instead of doing it.

/// Request headers a job may not set: framing (`Content-Length`,
/// `Transfer-Encoding`), routing (`Host`) and hop-by-hop headers. The
/// HTTP client sets the ones a request needs.
pub const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
];

/// Environment variables (exact names, or prefixes ending in `_`) that
/// make the dynamic loader, a shell or an interpreter run code the job's
/// program did not name, or change where `PATH` lookup finds it.
pub const FORBIDDEN_ENV: &[&str] = &[
    "LD_",
    "DYLD_",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "MALLOC_",
    "HOSTALIASES",
    "RESOLV_HOST_CONF",
    "LOCALDOMAIN",
    "NLSPATH",
    "PATH",
    "IFS",
    "ENV",
    "BASH_ENV",
    "BASH_FUNC_",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONINSPECT",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "PERL5DB",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    "GIT_SSH_COMMAND",
    "GIT_EXEC_PATH",
];

/// Why a job may not set header `name`, if it may not.
pub fn forbidden_header(name: &str) -> Option<String> {
    FORBIDDEN_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
        .then(|| {
            format!(
                "{name} is set by the HTTP client; a job may not set framing, routing or hop-by-hop headers"
            )
        })
}

/// Why a job may not set environment variable `name`, if it may not.
pub fn forbidden_env(name: &str) -> Option<String> {
    let upper = name.to_ascii_uppercase();
    FORBIDDEN_ENV
        .iter()
        .any(|f| {
            if f.ends_with('_') && f.len() > 1 {
                upper.starts_with(f)
            } else {
                upper == *f
            }
        })
        .then(|| {
            format!(
                "{name} changes which code a program loads or which program runs; \
                 jobs may not set it (it would defeat --command-allowlist)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_and_interpreter_variables_are_refused() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "ld_preload",
            "DYLD_INSERT_LIBRARIES",
            "BASH_ENV",
            "BASH_FUNC_x%%",
            "PATH",
            "PYTHONPATH",
            "NODE_OPTIONS",
            "GLIBC_TUNABLES",
            "_JAVA_OPTIONS",
        ] {
            assert!(forbidden_env(name).is_some(), "{name}");
        }
        for name in ["HOME_DIR", "BACKUP_PATH", "LANG", "ENVIRONMENT", "APP_LD"] {
            assert!(forbidden_env(name).is_none(), "{name}");
        }
    }

    #[test]
    fn framing_headers_are_refused() {
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "Connection",
            "TE",
            "Upgrade",
        ] {
            assert!(forbidden_header(name).is_some(), "{name}");
        }
        for name in ["Content-Type", "Authorization", "X-Host"] {
            assert!(forbidden_header(name).is_none(), "{name}");
        }
    }
}
