//! The published OpenAPI document is exactly what the code generates.

use crate::helpers::*;

const COMMITTED: &str = "openapi/cronguard.json";

#[tokio::test]
async fn the_committed_document_matches_the_code_and_is_served() {
    let generated = cronguard::api::openapi::document();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(COMMITTED);
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{COMMITTED} is out of date: run `UPDATE_OPENAPI=1 cargo test --test it openapi` and commit it"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let app = TestApp::spawn().await;
    let (status, served) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(served, doc);
    app.stop().await;
}

const BACKEND: &str = "openapi/backend.json";

#[test]
fn the_committed_backend_protocol_matches_the_code() {
    let generated = cronguard::protocol::backend_document();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(BACKEND);
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{BACKEND} is out of date: run `UPDATE_OPENAPI=1 cargo test --test it openapi` and commit it"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for schema in [
        "DesiredJobs",
        "ResultBatch",
        "RunResult",
        "Rejection",
        "JobSpec",
        "FieldError",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "{schema} missing"
        );
    }
    assert!(doc["paths"]["/v1/jobs"]["get"].is_object());
    assert!(doc["paths"]["/v1/results"]["post"].is_object());
}
