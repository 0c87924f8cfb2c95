//! The routing hash against the shared contract vectors (npm `string-hash` over Node's address text).

use std::net::IpAddr;
use sticky_cluster::hash::{node_address_text, string_hash};

fn vectors() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/string-hash-vectors.json");
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the contract vectors must sit beside the repository at {path}: {e}"));
    serde_json::from_str(&text).expect("vectors file is JSON")
}

#[test]
fn every_vector_text_hashes_like_npm_string_hash() {
    let vectors = vectors();
    let list = vectors["vectors"].as_array().expect("vectors array");
    assert!(list.len() >= 30, "expected the full vector set, got {}", list.len());
    for vector in list {
        let text = vector["text"].as_str().unwrap();
        let expected = vector["hash"].as_u64().unwrap() as u32;
        assert_eq!(string_hash(text), expected, "hash of {text:?}");
    }
}

#[test]
fn every_vector_address_formats_like_node_remote_address() {
    let vectors = vectors();
    let mut checked = 0;
    for vector in vectors["vectors"].as_array().unwrap() {
        let input = vector["input"].as_str().unwrap();
        if vector["family"] == "none" {
            continue;
        }
        let ip: IpAddr = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(node_address_text(ip), vector["text"].as_str().unwrap(), "text of {input}");
        checked += 1;
    }
    assert!(checked >= 30);
}
