//! The topology parser and validator on arbitrary documents.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardgate::fuzz::topology_document(data));
