//! On-disk formats of emulated media (no device logic): Hercules CKD DASD images.

pub mod ckd;
