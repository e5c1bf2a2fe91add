//! On-disk image formats (no device logic).

pub mod awstape;
