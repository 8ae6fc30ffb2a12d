//! HTTP/JSON transcoding (protocol spec §6.4): every discovered method over plain HTTP with
//! JSON bodies, on the front-end's port.
//!
//! - **Rules.** A method with a `google.api.http` option (MethodOptions extension 72295728) is
//!   served at its pattern (`get`, `put`, `post`, `delete`, `patch` or `custom`) and at each of
//!   its `additional_bindings`; any other method at `POST /<full service name>/<method>` with
//!   `body: "*"` ([`rules`]). Path templates ([`template`]) take `{field}`, `{field.sub}` and
//!   `{field=pattern}` variables with `*` and `**` segments and a `:verb` suffix.
//! - **Requests.** The message is built as one JSON object and read with the canonical proto3
//!   JSON mapping: the body (`"*"`: the whole message; a field name: that field; `""`: no body,
//!   and the query parameters `a.b=v` set fields), then the path variables over it. A rule with
//!   a body needs `Content-Type: application/json`.
//! - **Responses** are printed as protobuf-java's `JsonFormat` with
//!   `includingDefaultValueFields` and `omittingInsignificantWhitespace` (what the reference
//!   proxy does): compact, lowerCamel names, scalars of present messages printed even when zero,
//!   unset messages omitted, 64-bit integers as strings. `response_body` prints one field.
//! - **Server streaming**: `text/event-stream` (one `data:` event per message) when the client's
//!   `Accept` asks for it, else newline-delimited JSON (`application/x-ndjson`). A failure ends
//!   the stream with an SSE `error` event, or an NDJSON line `{"error":{"code","message"}}`.
//! - **Errors**: malformed JSON, a wrong content type, a bad path value: 400 with the reason. A
//!   user-function failure (UNKNOWN): 500 with its description as the body. Other gRPC statuses
//!   map as the HTTP mapping of `google.rpc.Code` says. Unknown path: 404; a path served under
//!   another method: 405.

pub mod rules;
pub mod template;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use prost::Message;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions, Value,
};
use tokio_stream::StreamExt;

use self::rules::{field_path, Rule};
use super::grpc::CallStream;
use super::{record, to_tonic, Frontend, Protocol};
use crate::entity::Headers;

/// A plain-text answer.
fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut r = (status, body.into()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn bad_request(reason: impl std::fmt::Display) -> Response {
    text(
        StatusCode::BAD_REQUEST,
        format!("Malformed request: {reason}"),
    )
}

/// The HTTP answer to a gRPC status (the mapping of `google.rpc.Code`); a user-function
/// failure (UNKNOWN) is 500 with its description, as the reference proxy answers.
pub fn status_response(status: &tonic::Status) -> Response {
    use tonic::Code;
    let code = match status.code() {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(code, status.message())
}

/// Serves one HTTP/JSON request.
pub async fn handle(frontend: &Frontend, req: Request) -> Response {
    let rules = frontend.http_rules.get(&frontend.backends());
    let path = req.uri().path().to_string();
    let mut path_matched = false;
    let mut found = None;
    for rule in rules.iter() {
        let Some(vars) = rule.template.matches(&path) else {
            continue;
        };
        path_matched = true;
        if rule.verb.eq_ignore_ascii_case(req.method().as_str()) {
            found = Some((rule, vars));
            break;
        }
    }
    let Some((rule, vars)) = found else {
        return if path_matched {
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not served for {path}", req.method()),
            )
        } else {
            text(
                StatusCode::NOT_FOUND,
                format!("no method is served at {path}"),
            )
        };
    };
    let accept_sse = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let payload = match request_message(frontend, rule, vars, req).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let entity_id = match frontend.check_request(&rule.target.method, &payload) {
        Ok(id) => Some(id),
        Err(status) => return status_response(&status),
    };
    let t = &rule.target;
    if !t.method.streamed {
        let started = std::time::Instant::now();
        let outcome = t
            .backend
            .command(&t.service, &t.method, payload, entity_id, None)
            .await
            .map_err(to_tonic);
        record(Protocol::Http, t, code_of(&outcome), Some(started));
        return match outcome {
            Ok(reply) => match print(
                &t.method.output,
                &reply.message.unwrap_or_default(),
                &rule.response_body,
            ) {
                Ok(json) => with_headers(json_response(json), reply.headers),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e),
            },
            Err(status) => status_response(&status),
        };
    }
    let call = t
        .backend
        .command_streamed(&t.service, &t.method, payload, entity_id, None)
        .await
        .map_err(to_tonic);
    record(Protocol::Http, t, code_of(&call), None);
    let mut call = match call {
        Ok(c) => c,
        Err(status) => return status_response(&status),
    };
    // the response headers come from the call's first reply
    let headers = (&mut call.headers).await.unwrap_or_default();
    let output = t.method.output.clone();
    let response_body = rule.response_body.clone();
    let stream = CallStream::new(call, None).map(move |item| {
        let chunk = match item {
            Ok(m) => match print(&output, &m, &response_body) {
                Ok(json) if accept_sse => format!("data: {json}\n\n"),
                Ok(json) => format!("{json}\n"),
                Err(e) => error_chunk(accept_sse, 13, &e),
            },
            Err(status) => error_chunk(accept_sse, status.code() as i32, status.message()),
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(chunk))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let content_type = if accept_sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_headers(resp, headers)
}

/// Adds a reply's headers to a response (what `grpc::set_headers` allows, as HTTP headers).
fn with_headers(mut resp: Response, headers: Headers) -> Response {
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if !super::grpc::header_allowed(&lower) {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            header::HeaderName::from_bytes(lower.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

fn code_of<T>(outcome: &Result<T, tonic::Status>) -> tonic::Code {
    outcome
        .as_ref()
        .map_or_else(tonic::Status::code, |_| tonic::Code::Ok)
}

fn error_chunk(sse: bool, code: i32, message: &str) -> String {
    if sse {
        let data = message.replace('\n', " ");
        format!("event: error\ndata: {data}\n\n")
    } else {
        let line = serde_json::json!({"error": {"code": code, "message": message}});
        format!("{line}\n")
    }
}

fn json_response(json: String) -> Response {
    let mut r = Response::new(Body::from(json));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The request message's bytes, from the body, the path variables and the query.
async fn request_message(
    frontend: &Frontend,
    rule: &Rule,
    vars: Vec<(Vec<String>, String)>,
    req: Request,
) -> Result<Vec<u8>, Response> {
    let input = &rule.target.method.input;
    let query = req.uri().query().unwrap_or("").to_string();
    let mut root = serde_json::Map::new();
    if !rule.body.is_empty() {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        if json_type.as_deref() != Some("application/json") {
            return Err(text(
                StatusCode::BAD_REQUEST,
                "Malformed request: the content type must be application/json",
            ));
        }
        let limit = frontend.limits.max_request_bytes;
        let body = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| {
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body cannot be read (at most {limit} bytes): {e}"),
                )
            })?;
        let value: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(&body).map_err(bad_request)?
        };
        if rule.body == "*" {
            match value {
                serde_json::Value::Object(o) => root = o,
                _ => return Err(bad_request("the body must be a JSON object")),
            }
        } else {
            root.insert(rule.body.clone(), value);
        }
    }
    if rule.body != "*" {
        // the query sets the fields the body and the path do not
        for (key, value) in form_urlencoded(&query) {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            let fields = field_path(input, &path).map_err(bad_request)?;
            set_path(&mut root, &fields, &value, true).map_err(bad_request)?;
        }
    }
    for (path, value) in vars {
        let fields = field_path(input, &path).map_err(bad_request)?;
        set_path(&mut root, &fields, &value, false).map_err(bad_request)?;
    }
    let message = DynamicMessage::deserialize(input.clone(), serde_json::Value::Object(root))
        .map_err(bad_request)?;
    Ok(message.encode_to_vec())
}

/// Sets the field at `fields` (a path from the root) to the text `value`, converted to what
/// the proto3 JSON mapping expects for the field; a repeated field gets the value appended
/// when `append`.
fn set_path(
    root: &mut serde_json::Map<String, serde_json::Value>,
    fields: &[FieldDescriptor],
    value: &str,
    append: bool,
) -> Result<(), String> {
    let Some((last, parents)) = fields.split_last() else {
        return Ok(());
    };
    let mut obj = root;
    for f in parents {
        proto_name_key(obj, f);
        let entry = obj
            .entry(f.name().to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if !entry.is_object() {
            *entry = serde_json::Value::Object(Default::default());
        }
        obj = entry
            .as_object_mut()
            .ok_or_else(|| format!("field {} is not a message", f.name()))?;
    }
    let v = json_scalar(last, value)?;
    proto_name_key(obj, last);
    if last.is_list() {
        let entry = obj
            .entry(last.name().to_string())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        match entry {
            serde_json::Value::Array(a) if append => a.push(v),
            other => *other = serde_json::Value::Array(vec![v]),
        }
    } else {
        obj.insert(last.name().to_string(), v);
    }
    Ok(())
}

/// Moves `field`'s value written under its JSON name (lowerCamel, as a body may) to its proto
/// name, where path and query values are set, so that the message has one of the two.
fn proto_name_key(obj: &mut serde_json::Map<String, serde_json::Value>, field: &FieldDescriptor) {
    if field.json_name() != field.name() {
        if let Some(v) = obj.remove(field.json_name()) {
            obj.insert(field.name().to_string(), v);
        }
    }
}

/// A path or query value as the JSON the field's kind reads.
fn json_scalar(field: &FieldDescriptor, value: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    let bad = || format!("{value:?} is not a value of field {}", field.name());
    Ok(match field.kind() {
        Kind::Bool => J::Bool(value.parse().map_err(|_| bad())?),
        Kind::Double | Kind::Float => match value.parse::<f64>() {
            Ok(n) if n.is_finite() => {
                serde_json::Number::from_f64(n).map_or(J::String(value.into()), J::Number)
            }
            _ => J::String(value.into()),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            J::Number(value.parse::<i32>().map_err(|_| bad())?.into())
        }
        Kind::Uint32 | Kind::Fixed32 => J::Number(value.parse::<u32>().map_err(|_| bad())?.into()),
        Kind::Enum(_) => match value.parse::<i32>() {
            Ok(n) => J::Number(n.into()),
            Err(_) => J::String(value.into()),
        },
        // strings, bytes (base64), 64-bit integers and well-known types read strings
        _ => J::String(value.into()),
    })
}

/// Decodes `application/x-www-form-urlencoded` pairs.
fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| template::percent_decode(&s.replace('+', " "));
            (dec(k), dec(v))
        })
        .collect()
}

/// Prints a reply (`bytes` of `output`) as the reference proxy's JSON, or its
/// `response_body` field alone.
fn print(output: &MessageDescriptor, bytes: &[u8], response_body: &str) -> Result<String, String> {
    let message = DynamicMessage::decode(output.clone(), bytes)
        .map_err(|e| format!("the reply is not a {}: {e}", output.full_name()))?;
    if response_body.is_empty() {
        return to_json(&message);
    }
    let field = output
        .get_field_by_name(response_body)
        .ok_or_else(|| format!("{} has no field {response_body}", output.full_name()))?;
    let value = message.get_field(&field);
    match (&*value, field.is_map()) {
        (Value::Message(m), _) => to_json(m),
        (Value::List(items), false) if items.iter().all(|i| matches!(i, Value::Message(_))) => {
            let parts: Result<Vec<String>, String> = items
                .iter()
                .filter_map(Value::as_message)
                .map(to_json)
                .collect();
            Ok(format!("[{}]", parts?.join(",")))
        }
        _ => {
            // scalars, lists of scalars and maps: through a JSON value of the whole message
            let whole: serde_json::Value =
                serde_json::from_str(&to_json(&message)?).map_err(|e| e.to_string())?;
            Ok(whole
                .get(field.json_name())
                .cloned()
                .unwrap_or(serde_json::Value::Null)
                .to_string())
        }
    }
}

fn to_json(message: &DynamicMessage) -> Result<String, String> {
    let options = SerializeOptions::new().skip_default_fields(false);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    message
        .serialize_with_options(&mut ser, &options)
        .map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prost_reflect::DescriptorPool;

    use super::*;

    #[test]
    fn path_values_join_what_the_body_set() {
        let file = DescriptorPool::global()
            .get_message_by_name("google.protobuf.FileDescriptorProto")
            .unwrap();
        let path = |p: &str| {
            let p: Vec<String> = p.split('.').map(str::to_string).collect();
            field_path(&file, &p).unwrap()
        };
        let mut root: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"name": "a.proto", "options": {"javaOuterClassname": "X"}, "publicDependency": [1]}"#,
        )
        .unwrap();
        set_path(&mut root, &path("options.java_package"), "p", false).unwrap();
        set_path(&mut root, &path("public_dependency"), "2", true).unwrap();
        set_path(&mut root, &path("name"), "b.proto", false).unwrap();
        assert_eq!(
            serde_json::Value::Object(root.clone()),
            serde_json::json!({
                "name": "b.proto",
                "options": {"javaOuterClassname": "X", "java_package": "p"},
                "public_dependency": [1, 2],
            })
        );
        let m = DynamicMessage::deserialize(file, serde_json::Value::Object(root)).unwrap();
        assert_eq!(
            to_json(&m).unwrap(),
            // (a proto2 file: its unset optional scalars have presence, and are left out)
            r#"{"name":"b.proto","dependency":[],"messageType":[],"enumType":[],"service":[],"extension":[],"options":{"javaPackage":"p","javaOuterClassname":"X","uninterpretedOption":[]},"publicDependency":[1,2],"weakDependency":[]}"#
        );
    }

    #[test]
    fn path_and_query_values_take_their_field_kind() {
        let field = |m: &str, f: &str| {
            DescriptorPool::global()
                .get_message_by_name(m)
                .unwrap()
                .get_field_by_name(f)
                .unwrap()
        };
        let int = field("google.protobuf.Int32Value", "value");
        assert_eq!(json_scalar(&int, "-7").unwrap(), serde_json::json!(-7));
        assert!(json_scalar(&int, "x").is_err());
        let b = field("google.protobuf.BoolValue", "value");
        assert_eq!(json_scalar(&b, "true").unwrap(), serde_json::json!(true));
        let long = field("google.protobuf.Int64Value", "value");
        assert_eq!(
            json_scalar(&long, "9007199254740993").unwrap(),
            serde_json::json!("9007199254740993")
        );
        assert_eq!(
            form_urlencoded("a.b=x+y&c=%2F&d"),
            vec![
                ("a.b".to_string(), "x y".to_string()),
                ("c".to_string(), "/".to_string()),
                ("d".to_string(), String::new())
            ]
        );
    }
}
