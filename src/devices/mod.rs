//! Device models driven by the emulated channel: 3390 ECKD DASD over Hercules CKD images.

pub mod dasd3390;
