//! The OpenAPI document as this server will behave: the generated document, with the configured
//! limits, the served models and their names written into the request schemas, so a client (or a
//! fuzzer) that follows the document is accepted and one that breaks it is refused.

use serde_json::{json, Value};

use crate::config::ServerConfig;
use crate::engine::{Models, DEFAULT_ALIAS};

const STATUSES: &str = "(queued|running|succeeded|failed|cancelled)";

/// `generated` (utoipa's document) with this configuration's limits and these models' names.
pub fn document(generated: &utoipa::openapi::OpenApi, config: &ServerConfig, models: &Models) -> Value {
    let mut doc = serde_json::to_value(generated).unwrap_or_else(|_| json!({}));
    let limits = &config.limits;
    let mut model_names: Vec<Value> = models.names().into_iter().map(|n| json!(n)).collect();
    model_names.push(json!(DEFAULT_ALIAS));
    let default = models.default_name().and_then(|n| models.get(n)).map(|e| e.config().clone());
    let classes = default.as_ref().map(|c| c.num_classes()).unwrap_or(1).max(1);
    let mut label_names: Vec<Value> = Vec::new();
    let mut presets: Vec<Value> = Vec::new();
    let mut schedules: Vec<Value> = vec![json!("uniform")];
    if let Some(cfg) = &default {
        label_names.extend(cfg.label_names.iter().map(|n| json!(n)));
        label_names.extend((0..classes).map(|i| json!(i.to_string())));
        presets.extend(cfg.presets.keys().map(|n| json!(n)));
        schedules.extend(cfg.schedules.keys().map(|n| json!(n)));
    }
    // The families the default model takes by bare name (flowturbo only where it recommends a plan).
    let samplers: Vec<Value> = flowgen_engine::samplers::sampler_names()
        .into_iter()
        .filter(|name| match &default {
            Some(cfg) => cfg.resolve_sampler(name).is_ok_and(|s| cfg.check_networks(&s).is_ok()),
            None => flowgen_engine::Sampler::parse(name).is_ok(),
        })
        .map(|name| json!(name))
        .collect();

    let schemas = &mut doc["components"]["schemas"];
    schemas["LabelValue"] = json!({
        "description": "A class label: its index or its name (or the index as a string)",
        "oneOf": [
            {"type": "integer", "minimum": 0, "maximum": classes - 1},
            {"type": "string", "enum": label_names},
        ]
    });
    let nullable = |schema: Value| json!({"oneOf": [{"type": "null"}, schema]});
    let count = json!({"type": "integer", "minimum": 1, "maximum": limits.max_n});
    let quality = json!({"type": "integer", "minimum": 1, "maximum": 100});
    let formats = json!({"type": "string", "enum": ["png", "jpeg", "jpg", "webp"]});
    let model = json!({"type": "string", "enum": model_names});
    let body = &mut schemas["GenerationBody"]["properties"];
    body["model"] = nullable(model.clone());
    body["n"] = nullable(count.clone());
    body["labels"] = nullable(json!({
        "type": "array", "minItems": 1, "maxItems": limits.max_n,
        "items": {"$ref": "#/components/schemas/LabelValue"}
    }));
    body["steps"] = nullable(json!({"type": "integer", "minimum": 1, "maximum": limits.max_steps}));
    body["guidance"] = nullable(json!({"type": "number", "minimum": 0, "maximum": limits.max_guidance}));
    body["guidance_interval"] = nullable(json!({
        "type": "array", "minItems": 2, "maxItems": 2,
        "items": {"type": "number", "minimum": 0, "maximum": 1},
        "description": "Two times s in [0, 1], in either order: guidance applies between them"
    }));
    body["seed"] = nullable(json!({"type": "integer", "minimum": 0, "maximum": crate::api::MAX_SEED}));
    body["priority"] = nullable(json!({"type": "string", "enum": ["high", "normal", "low"]}));
    body["output_format"] = nullable(formats.clone());
    body["output_compression"] = nullable(quality.clone());
    body["sampler"] = nullable(json!({
        "type": "string", "enum": samplers,
        "description": "A sampler family; dopri5 also takes parameters, e.g. \"dopri5:rtol=1e-4,atol=1e-4,max_nfe=500\" (max_nfe at most limits.max_nfe), and flowturbo a plan of Heun, pseudo-corrector and refiner steps, e.g. \"flowturbo:H2P4R2\" (on a model with a refiner; plain \"flowturbo\" is its recommended plan); fra is Blockwise Flow Matching's feature residual approximation (on a blockwise model with an FRN)"
    }));
    body["schedule"] = nullable(json!({
        "type": "string", "enum": schedules,
        "description": "uniform or a schedule the model stores; \"shift:<alpha>\" and explicit lists \"0,0.5,1\" are accepted too"
    }));
    body["preset"] = if presets.is_empty() {
        json!({"type": "null", "description": "This model has no presets"})
    } else {
        nullable(json!({"type": "string", "enum": presets}))
    };

    // `labels` and `label` are alternatives.
    schemas["GenerationBody"]["not"] = json!({
        "required": ["labels", "label"],
        "properties": {"labels": {"type": "array"}, "label": {"not": {"type": "null"}}}
    });
    let openai = &mut schemas["OpenAiImageRequest"]["properties"];
    openai["prompt"] = json!({"type": "string", "enum": label_names_or_digits(&default, classes),
        "description": "The class to draw: its name or index, e.g. \"7\" or \"seven\""});
    openai["model"] = nullable(model);
    openai["n"] = nullable(count);
    openai["response_format"] = nullable(json!({"type": "string", "enum": ["b64_json", "url"]}));
    openai["output_format"] = nullable(formats);
    openai["output_compression"] = nullable(quality);
    openai["seed"] = nullable(json!({"type": "integer", "minimum": 0, "maximum": crate::api::MAX_SEED}));
    let size = default.as_ref().map(|c| c.image_shape()).map(|(_, h, w)| format!("{w}x{h}"));
    openai["size"] = nullable(json!({"type": "string", "enum": [size.unwrap_or_else(|| "auto".into()), "auto"]}));

    if let Some(parameters) = doc["paths"]["/v1/generations"]["get"]["parameters"].as_array_mut() {
        for parameter in parameters {
            match parameter["name"].as_str() {
                Some("limit") => parameter["schema"] = json!({"type": "integer", "minimum": 1, "maximum": 500}),
                Some("status") => {
                    parameter["schema"] =
                        json!({"type": "string", "pattern": format!("^,*({STATUSES}(,+{STATUSES})*)?,*$")})
                }
                _ => {}
            }
        }
    }
    if let Some(parameters) = doc["paths"]["/v1/generations"]["post"]["parameters"].as_array_mut() {
        for parameter in parameters.iter_mut().filter(|p| p["name"] == "Idempotency-Key") {
            // Trailing spaces are not part of a header value (HTTP strips them on the wire).
            parameter["schema"] = json!({"type": "string", "pattern": "^[!-~]{1,255}[ \t]*$"});
        }
    }
    let image = &mut doc["paths"]["/v1/generations/{id}/images/{index}"]["get"]["parameters"];
    if let Some(parameters) = image.as_array_mut() {
        for parameter in parameters.iter_mut().filter(|p| p["name"] == "index") {
            parameter["schema"] = json!({"type": "integer", "minimum": 0, "maximum": limits.max_n - 1});
        }
    }
    doc
}

/// The prompts the OpenAI-style endpoint understands: every class name and index.
fn label_names_or_digits(cfg: &Option<flowgen_engine::ModelConfig>, classes: usize) -> Vec<Value> {
    let mut prompts: Vec<Value> = (0..classes).map(|i| json!(i.to_string())).collect();
    if let Some(cfg) = cfg {
        prompts.extend(cfg.label_names.iter().map(|n| json!(n)));
    }
    prompts
}
