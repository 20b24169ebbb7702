//! The topology parser and validator on arbitrary documents.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardgate::dev::fuzz::topology_document(data));
