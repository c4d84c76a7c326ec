//! Embeds the git revision in the binary (`cronguard_build_info`).
//! `CRONGUARD_GIT_REVISION` in the environment wins (container builds have
//! no `.git`); otherwise `git rev-parse`, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CRONGUARD_GIT_REVISION");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let revision = std::env::var("CRONGUARD_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        });
    println!(
        "cargo:rustc-env=CRONGUARD_GIT_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
}
