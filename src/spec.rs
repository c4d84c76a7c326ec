//! Post-processing shared by the two OpenAPI documents this crate
//! publishes: the public API (`api::openapi`) and the control backend
//! protocol (`protocol`). A leaf, so that neither reaches into the other.

use serde_json::Value;

/// Copies each union variant's tag property into the variant struct it
/// references.
///
/// utoipa describes `Cron(CronSpec)` of a `#[serde(tag = "kind")]` enum
/// as `allOf: [CronSpec, {kind}]`, and `CronSpec` says
/// `additionalProperties: false` (the server rejects unknown fields),
/// which would forbid `kind` itself. Both published documents need the
/// same repair.
pub fn close_tagged_unions(doc: &mut Value) {
    let mut tags: Vec<(String, Value)> = Vec::new();
    if let Some(schemas) = doc["components"]["schemas"].as_object() {
        for schema in schemas.values() {
            for branch in schema["oneOf"].as_array().into_iter().flatten() {
                let parts = branch["allOf"].as_array();
                let target = parts.and_then(|p| p.iter().find_map(|s| s["$ref"].as_str()));
                let tag = parts.and_then(|p| p.iter().find_map(|s| s["properties"].as_object()));
                if let (Some(target), Some(tag)) = (target, tag) {
                    let name = target.trim_start_matches("#/components/schemas/").to_owned();
                    for (key, value) in tag {
                        tags.push((format!("{name}/{key}"), value.clone()));
                    }
                }
            }
        }
    }
    for (at, value) in tags {
        let (name, key) = at.split_once('/').unwrap_or_default();
        let properties = doc
            .pointer_mut(&format!("/components/schemas/{name}/properties"))
            .and_then(Value::as_object_mut);
        if let Some(properties) = properties {
            properties.insert(key.to_owned(), value);
        }
    }
}
