//! The HTTP rules of the served methods: each method's `google.api.http` option (MethodOptions
//! extension 72295728) and its `additional_bindings`, or the generated
//! `POST /<full service name>/<method>` with `body: "*"`; rebuilt when a user function's spec
//! changes. A rule that cannot be served (a path variable or body naming no field, a bad
//! template) is logged and skipped.

use std::sync::{Arc, Mutex};

use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, Value,
};

use super::template::Template;
use crate::frontend::{Backend, Target};

/// The `google.api.http` extension.
pub const HTTP_RULE_EXTENSION: &str = "google.api.http";

/// One HTTP binding of a method.
pub struct Rule {
    /// upper-case HTTP method (a `custom` kind as given)
    pub verb: String,
    /// the path template
    pub template: Template,
    /// `""`, `"*"` or a field name
    pub body: String,
    /// `""` or a field name
    pub response_body: String,
    /// the method
    pub target: Arc<Target>,
}

/// The rules of the served methods, rebuilt when a user function's spec changes.
#[derive(Default)]
pub struct RuleCache {
    rules: Mutex<Option<CachedRules>>,
}

/// Rules built for this set of user functions, with specs of these fingerprints.
struct CachedRules {
    /// the set (held, so that a new set is never mistaken for it)
    set: Arc<Vec<Backend>>,
    fingerprints: Vec<u64>,
    rules: Arc<Vec<Rule>>,
}

impl RuleCache {
    /// The rules of `user_functions` as their specs are now.
    pub fn get(&self, user_functions: &Arc<Vec<Backend>>) -> Arc<Vec<Rule>> {
        let fingerprints: Vec<u64> = user_functions
            .iter()
            .map(|e| e.model().fingerprint)
            .collect();
        let mut cached = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            if Arc::ptr_eq(&c.set, user_functions) && c.fingerprints == fingerprints {
                return c.rules.clone();
            }
        }
        let rules = Arc::new(build_rules(user_functions));
        *cached = Some(CachedRules {
            set: user_functions.clone(),
            fingerprints,
            rules: rules.clone(),
        });
        rules
    }
}

fn build_rules(user_functions: &[Backend]) -> Vec<Rule> {
    let mut rules = Vec::new();
    for e in user_functions {
        let model = e.model();
        let ext = model.pool.get_extension_by_name(HTTP_RULE_EXTENSION);
        for entity in &model.entities {
            for m in &entity.methods {
                let Some(descriptor) = entity.service.methods().find(|d| d.name() == m.name) else {
                    continue;
                };
                let target = Arc::new(Target {
                    backend: e.clone(),
                    service: entity.service.full_name().to_string(),
                    method: m.clone(),
                });
                let option = ext.as_ref().and_then(|ext| http_rule(&descriptor, ext));
                match option {
                    Some(rule) => {
                        let mut bindings = vec![rule.clone()];
                        if let Some(Value::List(more)) =
                            rule.get_field_by_name("additional_bindings").as_deref()
                        {
                            bindings.extend(more.iter().filter_map(|v| v.as_message().cloned()));
                        }
                        for b in bindings {
                            match rule_of(&b, target.clone()) {
                                Ok(r) => rules.push(r),
                                Err(problem) => tracing::warn!(method = %m.path, %problem,
                                    "ignoring an HTTP rule that cannot be served"),
                            }
                        }
                    }
                    None => {
                        let path = format!("/{}/{}", target.service, m.name);
                        if let Ok(template) = Template::parse(&path) {
                            rules.push(Rule {
                                verb: "POST".into(),
                                template,
                                body: "*".into(),
                                response_body: String::new(),
                                target,
                            });
                        }
                    }
                }
            }
        }
    }
    rules
}

fn http_rule(
    method: &MethodDescriptor,
    ext: &prost_reflect::ExtensionDescriptor,
) -> Option<DynamicMessage> {
    let options = method.options();
    if !options.has_extension(ext) {
        return None;
    }
    options.get_extension(ext).as_message().cloned()
}

fn string_field(m: &DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn rule_of(rule: &DynamicMessage, target: Arc<Target>) -> Result<Rule, String> {
    let mut pattern = None;
    for verb in ["get", "put", "post", "delete", "patch"] {
        if rule.has_field_by_name(verb) {
            pattern = Some((verb.to_ascii_uppercase(), string_field(rule, verb)));
        }
    }
    if rule.has_field_by_name("custom") {
        if let Some(Value::Message(c)) = rule.get_field_by_name("custom").as_deref() {
            pattern = Some((string_field(c, "kind"), string_field(c, "path")));
        }
    }
    let (verb, path) = pattern.ok_or("no pattern")?;
    let template = Template::parse(&path)?;
    let input = &target.method.input;
    for var in template.variables() {
        field_path(input, var)?;
    }
    let body = string_field(rule, "body");
    if body != "*" && !body.is_empty() && input.get_field_by_name(&body).is_none() {
        return Err(format!("body field {body} is not in {}", input.full_name()));
    }
    Ok(Rule {
        verb,
        template,
        body,
        response_body: string_field(rule, "response_body"),
        target,
    })
}

/// The fields along a dotted path from `message`.
pub fn field_path(
    message: &MessageDescriptor,
    path: &[String],
) -> Result<Vec<FieldDescriptor>, String> {
    let mut out = Vec::new();
    let mut current = message.clone();
    for (i, name) in path.iter().enumerate() {
        let f = current
            .get_field_by_name(name)
            .ok_or_else(|| format!("{} has no field {name}", current.full_name()))?;
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() && !f.is_map() => current = m,
                _ => return Err(format!("field {name} is not a message")),
            }
        }
        out.push(f);
    }
    Ok(out)
}
