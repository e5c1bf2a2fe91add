//! Device models driven by the emulated channel: 3390 ECKD DASD over Hercules CKD images and
//! 3490 tape over AWSTAPE files.

pub mod dasd3390;
pub mod tape3490;
