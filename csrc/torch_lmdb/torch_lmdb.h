// torch_lmdb/torch_lmdb.h -- the whole public API: #include <torch_lmdb/torch_lmdb.h>
#pragma once
#include "torch_lmdb/collate.h"
#include "torch_lmdb/dataset.h"
#include "torch_lmdb/errors.h"
#include "torch_lmdb/loader.h"
#include "torch_lmdb/mixture.h"
#include "torch_lmdb/reader.h"
#include "torch_lmdb/record.h"
#include "torch_lmdb/selection.h"
#include "torch_lmdb/stream.h"
#include "torch_lmdb/version.h"
#include "torch_lmdb/writer.h"
