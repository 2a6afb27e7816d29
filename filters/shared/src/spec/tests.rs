use super::*;

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    n: Option<Integer<1, 100>>,
    d: Option<Duration>,
    name: Option<Name>,
    h: Option<HeaderName>,
    list: Option<Vec<Inner>>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inner {
    per: Duration,
}

fn err(text: &str) -> String {
    parse::<Doc>(text.as_bytes()).unwrap_err().to_string()
}

#[test]
fn paths_name_the_bad_field() {
    assert_eq!(
        err(r#"{"list": [{"per": "1s"}, {"per": "fast"}]}"#),
        r#"list[1].per: expected a duration like "1s", got "fast""#
    );
    assert_eq!(
        err(r#"{"list": [{"per": 1}]}"#),
        r#"list[0].per: invalid type: integer `1`, expected a duration like "1s""#
    );
    assert_eq!(err(r#"{"list": [{}]}"#), "list[0]: missing field `per`");
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    assert_eq!(
        err(r#"{"list": [{"per": "1s", "pre": 3}]}"#),
        "list[0].pre: unknown field `pre`, expected `per`"
    );
    assert!(err(r#"{"m": 3}"#).starts_with("m: unknown field `m`, expected one of"));
}

#[test]
fn integers_come_as_istio_sends_them() {
    let n = |text: &str| parse::<Doc>(text.as_bytes()).map(|d| d.n.map(Integer::get));
    assert_eq!(n(r#"{"n": 100}"#), Ok(Some(100)));
    assert_eq!(n(r#"{"n": 100.0}"#), Ok(Some(100)));
    assert_eq!(n(r#"{"n": 1e1}"#), Ok(Some(10)));
    assert_eq!(
        err(r#"{"n": 100.5}"#),
        "n: expected an integer from 1 to 100, got a decimal number"
    );
    assert_eq!(
        err(r#"{"n": -3}"#),
        "n: expected an integer from 1 to 100, got -3"
    );
    assert_eq!(
        err(r#"{"n": 101.0}"#),
        "n: expected an integer from 1 to 100, got 101"
    );
    assert_eq!(
        err(r#"{"n": "5"}"#),
        "n: invalid type: string \"5\", expected an integer from 1 to 100"
    );
}

#[test]
fn empty_bytes_are_an_empty_object() {
    assert!(parse::<Doc>(b"").unwrap().n.is_none());
    assert!(parse::<Doc>(b" \n").unwrap().n.is_none());
    assert!(parse::<Doc>(br#"{"n": null}"#).unwrap().n.is_none());
}

#[test]
fn syntax_errors_and_protobuf_bytes_get_a_hint() {
    let e = err("\x0a\x05rules");
    assert!(
        e.starts_with("configuration: expected a JSON object"),
        "{e}"
    );
    assert!(e.contains("StringValue"), "{e}");
    assert!(err("{").starts_with("configuration: invalid JSON"));
    assert!(err("{} x").starts_with("configuration: invalid JSON"));
    let e = err("[1]");
    assert!(
        e.starts_with("configuration: expected a JSON object"),
        "{e}"
    );
}

#[test]
fn names_and_header_names_are_checked() {
    let doc = parse::<Doc>(br#"{"h": "X-Api-Key", "name": "a.b:c-d_e"}"#).unwrap();
    assert_eq!(doc.h, Some(HeaderName("x-api-key".into())));
    assert_eq!(
        err(r#"{"h": "bad header"}"#),
        "h: \"bad header\" is not a valid header name"
    );
    assert!(parse::<Doc>(br#"{"h": ":authority"}"#).is_ok());
    assert!(err(r#"{"name": "a b"}"#).starts_with("name: \"a b\": use 1 to 64"));
    assert!(err(r#"{"name": ""}"#).starts_with("name: \"\": use 1 to 64"));
}

#[test]
fn hostile_nesting_is_refused_not_followed() {
    // The spec types stop at the first level that does not fit (a struct is
    // an object, never the list of its fields)...
    let deep = format!("{{\"list\": {}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(
        err(&deep),
        "list[0]: invalid type: sequence, expected struct Inner"
    );
    // ...a type that would descend meets the depth limit of the tree...
    let e = parse_fragment::<serde_json::Value>(deep.as_bytes()).unwrap_err();
    assert!(
        e.message.starts_with("nested more than 64 levels deep"),
        "{e}"
    );
    assert!(e.path.starts_with("list[0][0][0]"), "{e}");
    // ...and serde_json's recursion limit bounds whatever does descend.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let e = serde_json::from_str::<serde_json::Value>(&deep).unwrap_err();
    assert!(e.to_string().starts_with("recursion limit exceeded"), "{e}");
}

#[test]
fn a_struct_is_an_object_only() {
    assert_eq!(
        err(r#"{"list": [["1s"]]}"#),
        "list[0]: invalid type: sequence, expected struct Inner"
    );
}

#[test]
fn pairs_keep_the_order_written_and_the_last_of_a_repeated_key() {
    let pairs = |text: &str| parse_fragment::<Pairs<String, Integer<0, 9>>>(text.as_bytes());
    let got = pairs(r#"{"b": 1, "a": 2, "b": 3}"#).unwrap();
    let got: Vec<(String, u64)> = got.into_iter().map(|(k, v)| (k, v.get())).collect();
    assert_eq!(got, vec![("b".to_string(), 3), ("a".to_string(), 2)]);
    assert_eq!(
        pairs(r#"{"a": 10}"#).unwrap_err().to_string(),
        "a: expected an integer from 0 to 9, got 10"
    );
    assert_eq!(
        pairs("[1]").unwrap_err().to_string(),
        "configuration: invalid type: sequence, expected a map"
    );
}

#[test]
fn hostile_sizes_are_refused_and_not_echoed_in_full() {
    let huge = format!(r#"{{"name": "{}"}}"#, "a".repeat(1 << 20));
    assert_eq!(
        err(&huge),
        format!(
            "configuration: {} bytes; at most 262144 bytes are read",
            huge.len()
        )
    );
    let big = format!(r#"{{"name": "{}"}}"#, "é".repeat(50_000));
    let e = err(&big);
    assert!(e.starts_with("name: \"éé"), "{e}");
    assert!(e.len() < 400 && e.ends_with("..."), "{e}");
}

#[test]
fn type_errors_show_numbers_without_float_printing() {
    assert_eq!(
        err(r#"{"d": 100.0}"#),
        "d: invalid type: floating point `100.0`, expected a duration like \"1s\""
    );
    assert_eq!(
        err(r#"{"d": 1.5}"#),
        "d: invalid type: a decimal number, expected a duration like \"1s\""
    );
    assert_eq!(
        err(r#"{"d": true}"#),
        "d: invalid type: boolean `true`, expected a duration like \"1s\""
    );
}
