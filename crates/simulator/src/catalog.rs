//! The fake catalog and the OData query options of Sales Layer's Catalog
//! REST API v2, pure: which items a list request gets, how the next page is
//! linked, what a new product must hold. No I/O, no clock.
//!
//! Three collections with fixed, deterministic content: [`PRODUCTS`]
//! products (`prod_id` 1…), two variants per product (`frmt_id`), and
//! [`CATEGORIES`] categories (`cat_id`), each ordered by its id. A list takes
//! `$top` (at most [`MAX_TOP`] items; more is capped, as the vendor does),
//! `$skip`, `$skipToken` (the id of the last item already seen: keyset
//! paging, which the `@nextLink` uses), `$count` and `$select`. `$filter`,
//! `$orderby` and `$expand` exist upstream but not here: they answer 400,
//! so a client never believes a filter was applied when it was not.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// Products in the catalog.
pub const PRODUCTS: u64 = 5_000;
/// Variants per product.
pub const VARIANTS_PER_PRODUCT: u64 = 2;
/// Categories in the catalog.
pub const CATEGORIES: u64 = 40;
/// The most items one page holds.
pub const MAX_TOP: u64 = 100;
/// Where the collections live, as on `api2.saleslayer.com`.
pub const BASE_PATH: &str = "/catalog/rest/Catalog";

/// One of the three collections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Collection {
    Products,
    Variants,
    Categories,
}

impl Collection {
    pub const ALL: [Collection; 3] = [Self::Products, Self::Variants, Self::Categories];

    /// The collection named by a path segment.
    pub fn from_segment(segment: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == segment)
    }

    /// The path segment (`Products`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Products => "Products",
            Self::Variants => "Variants",
            Self::Categories => "Categories",
        }
    }

    /// Items in the collection.
    pub fn size(self) -> u64 {
        match self {
            Self::Products => PRODUCTS,
            Self::Variants => PRODUCTS * VARIANTS_PER_PRODUCT,
            Self::Categories => CATEGORIES,
        }
    }

    /// The field that identifies an item and orders the collection.
    pub fn key_field(self) -> &'static str {
        self.fields()[0].0
    }

    /// Every field, key first, with its JSON schema type.
    pub fn fields(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Products => &[
                ("prod_id", "integer"),
                ("prod_ref", "string"),
                ("prod_title", "array"),
                ("prod_description", "array"),
                ("cat_id", "integer"),
                ("prod_stat", "string"),
                ("prod_price", "number"),
            ],
            Self::Variants => &[
                ("frmt_id", "integer"),
                ("frmt_ref", "string"),
                ("prod_id", "integer"),
                ("frmt_title", "array"),
                ("frmt_stock", "integer"),
            ],
            Self::Categories => &[
                ("cat_id", "integer"),
                ("cat_ref", "string"),
                ("cat_title", "array"),
                ("cat_parent_id", "integer"),
            ],
        }
    }

    /// Item `id` (from 1), every field.
    pub fn item(self, id: u64) -> Map<String, Value> {
        const MATERIALS: [&str; 8] = [
            "Oak", "Steel", "Linen", "Walnut", "Cotton", "Ceramic", "Bamboo", "Leather",
        ];
        const THINGS: [&str; 8] = [
            "Chair", "Lamp", "Table", "Shelf", "Cushion", "Vase", "Stool", "Rug",
        ];
        let localized = |text: String| json!([{"culture": "en", "value": text}]);
        let value = match self {
            Self::Products => {
                // A fixed scramble: prices look varied but are the same on every run.
                let cents = 199 + id.wrapping_mul(7919) % 49_800;
                let name = format!(
                    "{} {} {id}",
                    MATERIALS[(id % 8) as usize],
                    THINGS[(id / 8 % 8) as usize]
                );
                json!({
                    "prod_id": id,
                    "prod_ref": format!("SKU-{id:06}"),
                    "prod_title": localized(name.clone()),
                    "prod_description": localized(format!("{name}, made to last.")),
                    "cat_id": 1 + id % CATEGORIES,
                    "prod_stat": if id.is_multiple_of(17) { "I" } else { "V" },
                    "prod_price": cents as f64 / 100.0,
                })
            }
            Self::Variants => {
                let product = id.div_ceil(VARIANTS_PER_PRODUCT);
                let size = if id % VARIANTS_PER_PRODUCT == 1 {
                    "S"
                } else {
                    "L"
                };
                json!({
                    "frmt_id": id,
                    "frmt_ref": format!("SKU-{product:06}-{size}"),
                    "prod_id": product,
                    "frmt_title": localized(format!("Size {size}")),
                    "frmt_stock": id.wrapping_mul(31) % 120,
                })
            }
            Self::Categories => json!({
                "cat_id": id,
                "cat_ref": format!("CAT-{id:03}"),
                "cat_title": localized(format!("{}s", THINGS[(id % 8) as usize])),
                "cat_parent_id": if id <= 8 { 0 } else { 1 + id % 8 },
            }),
        };
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    /// The JSON schema of one item, as `$metadata` answers it.
    pub fn metadata(self) -> Value {
        let properties: Map<String, Value> = self
            .fields()
            .iter()
            .map(|&(name, kind)| ((*name).to_owned(), json!({"title": name, "type": kind})))
            .collect();
        let singular = self.name().trim_end_matches('s');
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": format!("/metadata/simulator/{singular}/1.0.0.0"),
            "type": "object",
            "title": singular,
            "properties": properties,
        })
    }
}

/// A list request's options, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub top: u64,
    pub skip: u64,
    /// Only items whose key is above this.
    pub skip_token: Option<u64>,
    pub count: bool,
    /// The fields to keep; all when `None`.
    pub select: Option<Vec<String>>,
}

/// What a request got wrong, by the option or field it concerns, as the
/// vendor's 400 body `{"validationFailures": {"field": ["message"]}}`.
pub type ValidationFailures = BTreeMap<String, Vec<String>>;

/// Parse a raw query string for `collection`.
pub fn parse_list_query(
    collection: Collection,
    query: Option<&str>,
) -> Result<ListQuery, ValidationFailures> {
    let mut failures = ValidationFailures::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(name) = percent_decode(raw_name) else {
            fail(&mut failures, "query", "not valid percent-encoded UTF-8");
            continue;
        };
        if !name.starts_with('$') {
            continue;
        }
        let Some(value) = percent_decode(raw_value) else {
            fail(&mut failures, &name, "not valid percent-encoded UTF-8");
            continue;
        };
        if seen.contains_key(&name) {
            fail(&mut failures, &name, "given more than once");
            continue;
        }
        if seen.len() >= 16 {
            fail(&mut failures, "query", "more than 16 OData options");
            break;
        }
        seen.insert(name, value);
    }
    let mut number = |name: &str, default: u64| match seen.get(name) {
        None => default,
        Some(text) => unsigned(text).unwrap_or_else(|| {
            let message = format!("must be a non-negative integer, got {:?}", shown(text));
            fail(&mut failures, name, &message);
            default
        }),
    };
    let top = number("$top", MAX_TOP).min(MAX_TOP);
    let skip = number("$skip", 0);
    let skip_token = seen
        .contains_key("$skipToken")
        .then(|| number("$skipToken", 0));
    let count = match seen.get("$count").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            let message = format!("must be true or false, got {:?}", shown(other));
            fail(&mut failures, "$count", &message);
            false
        }
    };
    let select = seen.get("$select").map(|list| {
        let fields: Vec<String> = list.split(',').map(|f| f.trim().to_owned()).collect();
        for field in &fields {
            if !collection.fields().iter().any(|(known, _)| known == field) {
                let known: Vec<&str> = collection.fields().iter().map(|(n, _)| *n).collect();
                let message = format!(
                    "{:?} is not a field of {}; its fields: {}",
                    shown(field),
                    collection.name(),
                    known.join(", ")
                );
                fail(&mut failures, "$select", &message);
            }
        }
        fields
    });
    for name in seen.keys() {
        match name.as_str() {
            "$top" | "$skip" | "$skipToken" | "$count" | "$select" => {}
            "$filter" | "$orderby" | "$expand" | "$search" => fail(
                &mut failures,
                name,
                "supported by Sales Layer but not by this simulator",
            ),
            _ => fail(&mut failures, name, "not an OData option of this API"),
        }
    }
    if failures.is_empty() {
        Ok(ListQuery {
            top,
            skip,
            skip_token,
            count,
            select,
        })
    } else {
        Err(failures)
    }
}

fn fail(failures: &mut ValidationFailures, field: &str, message: &str) {
    // A hostile query cannot make the answer large: a few fields, a few messages.
    if failures.len() >= 16 && !failures.contains_key(field) {
        return;
    }
    let messages = failures.entry(shown(field)).or_default();
    if messages.len() < 4 {
        messages.push(message.to_owned());
    }
}

/// One page of a collection.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub items: Vec<Map<String, Value>>,
    /// The id of the last item, when there are more after it.
    pub more_after: Option<u64>,
    pub count: Option<u64>,
}

/// The page `query` asks for.
pub fn page(collection: Collection, query: &ListQuery) -> Page {
    let total = collection.size();
    let first = query
        .skip_token
        .unwrap_or(0)
        .saturating_add(1)
        .saturating_add(query.skip);
    let last = first.saturating_add(query.top).saturating_sub(1).min(total);
    let items: Vec<Map<String, Value>> = (first..=last)
        .map(|id| select(collection.item(id), query.select.as_deref()))
        .collect();
    let more_after = (!items.is_empty() && last < total).then_some(last);
    Page {
        items,
        more_after,
        count: query.count.then_some(total),
    }
}

fn select(mut item: Map<String, Value>, fields: Option<&[String]>) -> Map<String, Value> {
    if let Some(fields) = fields {
        item.retain(|name, _| fields.iter().any(|f| f == name));
    }
    item
}

/// The query of the page after `last_id`: the same options, keyset-paged.
pub fn next_query(query: &ListQuery, last_id: u64) -> String {
    let mut next = format!("$top={}&$skipToken={last_id}", query.top);
    if let Some(fields) = &query.select {
        next.push_str("&$select=");
        next.push_str(&fields.join(","));
    }
    if query.count {
        next.push_str("&$count=true");
    }
    next
}

/// Validate the body of `POST .../Products`: a JSON object with a non-empty
/// `prod_ref`, only known writable fields, `prod_title` and
/// `prod_description` as `[{"culture","value"}]`.
pub fn validate_new_product(body: &[u8]) -> Result<Map<String, Value>, ValidationFailures> {
    let mut failures = ValidationFailures::new();
    let object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            fail(&mut failures, "body", "must be a JSON object");
            return Err(failures);
        }
        Err(error) => {
            fail(&mut failures, "body", &format!("not JSON: {error}"));
            return Err(failures);
        }
    };
    match object.get("prod_ref") {
        Some(Value::String(reference)) if !reference.trim().is_empty() => {
            if reference.chars().count() > 100 {
                fail(&mut failures, "prod_ref", "must be at most 100 characters");
            }
        }
        Some(_) => fail(&mut failures, "prod_ref", "must be a non-empty string"),
        None => fail(&mut failures, "prod_ref", "is required"),
    }
    for (name, value) in &object {
        match name.as_str() {
            "prod_ref" => {}
            "prod_title" | "prod_description" => {
                let localized = value.as_array().is_some_and(|entries| {
                    entries.iter().all(|entry| {
                        entry.get("culture").is_some_and(Value::is_string)
                            && entry.get("value").is_some_and(Value::is_string)
                    })
                });
                if !localized {
                    fail(
                        &mut failures,
                        name,
                        "must be an array of {\"culture\", \"value\"} strings",
                    );
                }
            }
            "cat_id" if !value.is_u64() => fail(&mut failures, name, "must be an integer id"),
            "prod_price" if !value.is_number() => fail(&mut failures, name, "must be a number"),
            "prod_stat" if !matches!(value.as_str(), Some("V" | "I" | "D" | "R")) => {
                fail(&mut failures, name, "must be one of V, I, D, R")
            }
            "cat_id" | "prod_price" | "prod_stat" => {}
            _ => fail(&mut failures, name, "is not a writable field of Products"),
        }
    }
    if failures.is_empty() {
        Ok(object)
    } else {
        Err(failures)
    }
}

/// Digits only: Rust's integer parsing would also take a leading `+`.
fn unsigned(text: &str) -> Option<u64> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// Decode `%XX` escapes and `+` (a space in a query); `None` if malformed.
pub fn percent_decode(raw: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        match byte {
            b'%' => {
                let [high, low, ..] = *tail else { return None };
                let digit = |b: u8| (b as char).to_digit(16);
                bytes.push((digit(high)? * 16 + digit(low)?) as u8);
                rest = &tail[2..];
            }
            b'+' => {
                bytes.push(b' ');
                rest = tail;
            }
            _ => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

/// A client's value, cut short so an error body stays small.
pub fn shown(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn query(raw: &str) -> Result<ListQuery, ValidationFailures> {
        parse_list_query(Collection::Products, Some(raw))
    }

    fn ids(page: &Page, collection: Collection) -> Vec<u64> {
        page.items
            .iter()
            .filter_map(|item| item.get(collection.key_field()).and_then(Value::as_u64))
            .collect()
    }

    #[test]
    fn defaults_are_a_full_first_page_without_count() {
        let parsed = parse_list_query(Collection::Products, None).expect("no options");
        assert_eq!(
            parsed,
            ListQuery {
                top: 100,
                skip: 0,
                skip_token: None,
                count: false,
                select: None
            }
        );
        let first = page(Collection::Products, &parsed);
        assert_eq!(
            ids(&first, Collection::Products),
            (1..=100).collect::<Vec<_>>()
        );
        assert_eq!((first.more_after, first.count), (Some(100), None));
        assert_eq!(first.items[0]["prod_ref"], "SKU-000001");
    }

    #[test]
    fn top_is_capped_at_100_and_skip_and_skip_token_add_up() {
        assert_eq!(query("$top=500").map(|q| q.top), Ok(100));
        // Shells and URL builders often escape the dollar: `%24top`.
        assert_eq!(
            query("%24top=5&%24skip=10").map(|q| (q.top, q.skip)),
            Ok((5, 10))
        );
        let q = query("$top=10&$skip=5&$skipToken=20&$count=true").expect("valid");
        let got = page(Collection::Products, &q);
        assert_eq!(
            ids(&got, Collection::Products),
            (26..=35).collect::<Vec<_>>()
        );
        assert_eq!((got.more_after, got.count), (Some(35), Some(PRODUCTS)));
        assert_eq!(next_query(&q, 35), "$top=10&$skipToken=35&$count=true");
    }

    #[test]
    fn the_last_page_links_nowhere_and_past_the_end_is_empty() {
        let q = query("$skipToken=4950").expect("valid");
        let last = page(Collection::Products, &q);
        assert_eq!(last.items.len(), 50);
        assert_eq!(last.more_after, None);
        for raw in ["$skipToken=5000", "$skip=18446744073709551615", "$top=0"] {
            let got = page(Collection::Products, &query(raw).expect("valid"));
            assert!(got.items.is_empty() && got.more_after.is_none(), "{raw}");
        }
    }

    #[test]
    fn select_keeps_only_the_named_fields() {
        let q = query("$select=prod_id,%20prod_ref&$top=1").expect("valid");
        let got = page(Collection::Products, &q);
        let fields: Vec<&String> = got.items[0].keys().collect();
        assert_eq!(fields, ["prod_id", "prod_ref"]);
        assert_eq!(
            next_query(&q, 1),
            "$top=1&$skipToken=1&$select=prod_id,prod_ref"
        );
    }

    #[test]
    fn bad_options_are_named_in_the_validation_failures() {
        let failures = query("$top=-1&$count=yes&$select=price&$filter=x&$top=2&$bogus=1")
            .expect_err("invalid");
        let names: Vec<&String> = failures.keys().collect();
        assert_eq!(
            names,
            ["$bogus", "$count", "$filter", "$select", "$top"],
            "{failures:?}"
        );
        assert!(failures["$select"][0].contains("prod_ref"));
        assert!(query("$skip=%zz").is_err());
        // Options that are not OData's are ignored, as before.
        assert!(query("page=3&pageSize=x").is_ok());
        let long = format!("$top={}", "9".repeat(5000));
        let message = &query(&long).expect_err("too big")["$top"][0];
        assert!(message.len() < 120, "{message}");
    }

    #[test]
    fn the_three_collections_are_deterministic_and_consistent() {
        assert_eq!(Collection::Variants.size(), 10_000);
        let variant = Collection::Variants.item(4);
        assert_eq!(
            (variant["prod_id"].as_u64(), variant["frmt_ref"].as_str()),
            (Some(2), Some("SKU-000002-L"))
        );
        assert_eq!(Collection::Products.item(7), Collection::Products.item(7));
        let category = Collection::Categories.item(12);
        assert!(
            category["cat_parent_id"]
                .as_u64()
                .is_some_and(|p| (1..=8).contains(&p))
        );
        for collection in Collection::ALL {
            let item = collection.item(1);
            let fields: Vec<&str> = collection.fields().iter().map(|(n, _)| *n).collect();
            assert_eq!(item.len(), fields.len(), "{collection:?}");
            assert!(fields.iter().all(|f| item.contains_key(*f)));
            assert_eq!(
                Collection::from_segment(collection.name()),
                Some(collection)
            );
            assert_eq!(
                collection.metadata()["properties"]
                    .as_object()
                    .map(Map::len),
                Some(fields.len())
            );
        }
    }

    #[test]
    fn a_new_product_needs_a_reference_and_known_fields() {
        let ok = validate_new_product(
            br#"{"prod_ref":"NEW-1","prod_title":[{"culture":"en","value":"New"}],"prod_price":9.5}"#,
        );
        assert!(ok.is_ok(), "{ok:?}");
        let failures =
            validate_new_product(br#"{"prod_title":"x","colour":"red"}"#).expect_err("invalid");
        assert_eq!(
            failures.keys().collect::<Vec<_>>(),
            ["colour", "prod_ref", "prod_title"]
        );
        assert_eq!(failures["prod_ref"], ["is required"]);
        assert!(validate_new_product(b"[1]").is_err());
        assert!(validate_new_product(b"{").is_err());
    }

    proptest! {
        /// Following the links from any start visits every item after it
        /// exactly once, in order, whatever the page size.
        #[test]
        fn next_links_walk_the_collection_once(top in 1u64..=150, start in 0u64..5_100) {
            let mut q = query(&format!("$top={top}&$skipToken={start}")).expect("valid");
            let mut seen = Vec::new();
            for _ in 0..6_000 {
                let got = page(Collection::Products, &q);
                seen.extend(ids(&got, Collection::Products));
                let Some(last) = got.more_after else { break };
                q = query(&next_query(&q, last)).expect("our own link parses");
            }
            let expected: Vec<u64> = (start + 1..=PRODUCTS).collect();
            prop_assert_eq!(seen, expected);
        }

        #[test]
        fn any_query_parses_or_fails_without_panicking(raw in ".{0,200}") {
            let _ = parse_list_query(Collection::Variants, Some(&raw));
        }
    }
}
