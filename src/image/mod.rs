//! On-disk formats of emulated media (no device logic): Hercules CKD DASD images and AWSTAPE
//! tape files.

pub mod awstape;
pub mod ckd;
pub mod file;
pub mod map;

pub use file::ImageFile;
