// Compiles the header on its own: it must include everything it needs.
#include "anyevent_task.hpp"
