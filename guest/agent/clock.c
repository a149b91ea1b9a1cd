/* Time: wall clock for boot logs, calibrated TSC for the hot path. */
#include <time.h>

#include "agent.h"

static struct {
    uint64_t tsc_begin;
    double wall_begin;
    double ns_per_tick; /* 0 until calibrated */
} calibration;

double kvmfork_uptime_seconds(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_BOOTTIME, &ts) != 0)
        return 0.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double monotonic_seconds(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void kvmfork_tsc_calibration_begin(void)
{
    calibration.wall_begin = monotonic_seconds();
    calibration.tsc_begin = kvmfork_rdtsc();
}

void kvmfork_tsc_calibration_end(void)
{
    /* The warm-up lasts seconds to minutes, so one pair of samples is
     * precise enough without a dedicated busy-wait. */
    double wall = monotonic_seconds() - calibration.wall_begin;
    uint64_t ticks = kvmfork_rdtsc() - calibration.tsc_begin;
    if (wall > 0.01 && ticks > 0)
        calibration.ns_per_tick = wall * 1e9 / (double)ticks;
}

uint64_t kvmfork_tsc_to_ns(uint64_t ticks)
{
    return (uint64_t)((double)ticks * calibration.ns_per_tick);
}
