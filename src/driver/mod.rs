//! The vfio-ccw device: its uAPI regions (and, as they land, the FSM, IRQs, reset and the
//! `Subchannel` backend trait).

pub mod regions;
